"""Distributed launch of a stage: torchrun / mpirun / srun → `vlflow.launch.worker` → colossalai + Booster.

This module runs in the runner's process and must stay free of torch imports; the worker and booster modules
import torch/colossalai in the launched processes only.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Callable

from vlflow.errors import LaunchError
from vlflow.execute import result_path
from vlflow.launch.command import JOIN_DIR_ENV, build_command, free_port, launcher_env
from vlflow.procs import die_with_parent
from vlflow.stage import LaunchSpec, StageSpec

__all__ = ["run_distributed", "build_command", "free_port", "LaunchError"]

LOG_TAIL_LINES = 40
WORKER_ERROR_PREFIX = "error: "  # what the worker prints for a user-facing (VlflowError) failure
TERMINATE_GRACE_SECONDS = 10


def run_distributed(spec: StageSpec, payload_path: Path, launch: LaunchSpec | None, log_path: Path,
                    env: dict | None = None, on_line: Callable[[str], None] | None = None,
                    joining: bool = False) -> dict | None:
    """Launch all ranks of `spec` on this node, stream their output into `log_path`, return rank 0's metrics.

    `launch` (None: the payload's `launch`, else defaults) is also written into the payload for the workers.
    Raises LaunchError with the end of the log when any rank fails. On KeyboardInterrupt the whole process group
    (launcher and every rank) is stopped before the interrupt propagates.

    torchrun across machines (nnodes > 1): only node 0 runs stages and commits them (`vlflow run`). Inside a Slurm
    allocation srun starts torchrun's agent on every node itself (see command.srun_starts_torchrun). Otherwise the
    other nodes join: with VLFLOW_JOIN_DIR set, node 0 announces each launch there for their
    `python -m vlflow.launch.join`.
    `joining=True` is such a node's agent (node_rank > 0): node 0's payload stays as it is and the result is node 0's,
    so it returns None. Without it a node_rank > 0 is refused, since the caller would commit a stage node 0 commits.
    """
    payload_path = Path(payload_path)
    payload = json.loads(payload_path.read_text())
    if launch is None:
        launch = LaunchSpec(**(payload.get("launch") or {}))
    elif not joining and payload.get("launch") != launch.model_dump():
        # The worker builds the Booster from the payload: make it describe the launch actually used.
        payload["launch"] = launch.model_dump()
        payload_path.write_text(json.dumps(payload, indent=1))
    _check_node_role(launch, joining)
    command = build_command(launch, payload_path, forward_env=sorted(env or {}))
    result_file = result_path(payload_path)
    if not joining:
        result_file.unlink(missing_ok=True)  # never report a previous attempt's metrics
    announcement = None
    if launch.launcher == "torchrun" and launch.nnodes > 1 and not joining and os.environ.get(JOIN_DIR_ENV):
        announcement = _announce(Path(os.environ[JOIN_DIR_ENV]), payload.get("stage", spec.name), spec,
                                 payload_path, launch)
    try:
        return _launch(spec, payload, payload_path, launch, command, result_file, log_path, env, on_line, joining)
    finally:
        if announcement is not None:  # a node that starts later must not join a finished launch
            announcement.unlink(missing_ok=True)


def _check_node_role(launch: LaunchSpec, joining: bool) -> None:
    other_node = launch.launcher == "torchrun" and launch.nnodes > 1 and launch.node_rank > 0
    if joining and not other_node:
        raise LaunchError("joining a launch needs launcher torchrun with nnodes > 1 and a node_rank above 0",
                          field="launch.node_rank")
    if other_node and not joining:
        raise LaunchError(f"node_rank {launch.node_rank}: only node 0 runs `vlflow run` (it runs every stage and "
                          "commits it); on the other nodes run `python -m vlflow.launch.join --node-rank "
                          f"{launch.node_rank} JOIN_DIR`, with {JOIN_DIR_ENV}=JOIN_DIR set for node 0's vlflow run "
                          "(see docs/CLUSTER.md)", field="launch.node_rank")


def _announce(join_dir: Path, stage: str, spec: StageSpec, payload_path: Path, launch: LaunchSpec) -> Path:
    """Publish a launch for the joining nodes: written whole, then renamed, so a reader never sees half a file."""
    join_dir.mkdir(parents=True, exist_ok=True)
    announcement = join_dir / f"{time.time_ns()}-{stage}.json"
    temporary = join_dir / f".{announcement.name}.tmp"
    temporary.write_text(json.dumps({"stage": stage, "uses": spec.name, "payload": str(payload_path.resolve()),
                                     "launch": launch.model_dump(), "host": socket.gethostname()}))
    os.replace(temporary, announcement)
    return announcement


def _launch(spec: StageSpec, payload: dict, payload_path: Path, launch: LaunchSpec, command: list[str],
            result_file: Path, log_path: Path, env: dict | None, on_line: Callable[[str], None] | None,
            joining: bool) -> dict | None:
    process_env = dict(os.environ, PYTHONUNBUFFERED="1", **launcher_env(launch))
    process_env.update(env or {})

    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    first_user_error = None  # workers print user-facing errors as one "error: ..." line
    with open(log_path, "a") as log:
        log.write(f"# {shlex.join(command)}\n")
        log.flush()
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=process_env, start_new_session=True, preexec_fn=die_with_parent)
        except FileNotFoundError:
            raise LaunchError(f"launcher {command[0]!r} not found on PATH (launch.launcher = {launch.launcher})",
                              field="launch.launcher") from None
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                tail.append(line)
                if first_user_error is None and line.startswith(WORKER_ERROR_PREFIX):
                    first_user_error = line[len(WORKER_ERROR_PREFIX):]
                if on_line is not None:
                    on_line(line)
            returncode = process.wait()
        except BaseException:  # KeyboardInterrupt, or a failing on_line: leave no rank behind
            _stop_group(process)
            raise
        finally:
            process.stdout.close()

    if returncode != 0:
        raise LaunchError(_failure_message(f"{payload.get('stage', spec.name)} ({spec.name})", returncode,
                                           first_user_error, list(tail), log_path))
    if joining or not result_file.exists():
        return None
    return json.loads(result_file.read_text())


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (torchrun forwards it to the ranks), then SIGKILL whatever is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(process.pid, signal.SIGKILL)  # a rank may outlive the launcher
    except ProcessLookupError:  # the whole group is already gone
        pass
    process.wait()


def _failure_message(stage: str, returncode: int, user_error: str | None, tail: list[str], log_path: Path) -> str:
    if returncode < 0:
        reason = f"killed by signal {signal.Signals(-returncode).name}"
    else:
        reason = f"exit code {returncode}"
    headline = f": {user_error}" if user_error else ""
    return (f"distributed stage {stage} failed ({reason}){headline}\n"
            f"--- last {len(tail)} lines of {log_path} ---\n" + "\n".join(tail))

