"""Distributed launch of a stage: torchrun / mpirun / srun → `vlflow.launch.worker` → colossalai + Booster.

This module runs in the runner's process and must stay free of torch imports; the worker and booster modules
import torch/colossalai in the launched processes only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import deque
from pathlib import Path
from typing import Callable

from vlflow.procs import die_with_parent
from vlflow.errors import LaunchError
from vlflow.execute import result_path
from vlflow.launch.command import build_command, free_port, launcher_env
from vlflow.stage import LaunchSpec, StageSpec

__all__ = ["run_distributed", "build_command", "free_port", "LaunchError"]

LOG_TAIL_LINES = 40
WORKER_ERROR_PREFIX = "error: "  # what the worker prints for a user-facing (VlflowError) failure
TERMINATE_GRACE_SECONDS = 10


def run_distributed(spec: StageSpec, payload_path: Path, launch: LaunchSpec | None, log_path: Path,
                    env: dict | None = None, on_line: Callable[[str], None] | None = None) -> dict | None:
    """Launch all ranks of `spec` on this node, stream their output into `log_path`, return rank 0's metrics.

    `launch` (None: the payload's `launch`, else defaults) is also written into the payload for the workers.
    Raises LaunchError with the end of the log when any rank fails. On KeyboardInterrupt the whole process group
    (launcher and every rank) is stopped before the interrupt propagates.
    """
    payload_path = Path(payload_path)
    payload = json.loads(payload_path.read_text())
    if launch is None:
        launch = LaunchSpec(**(payload.get("launch") or {}))
    elif payload.get("launch") != launch.model_dump():
        # The worker builds the Booster from the payload: make it describe the launch actually used.
        payload["launch"] = launch.model_dump()
        payload_path.write_text(json.dumps(payload, indent=1))
    command = build_command(launch, payload_path, forward_env=sorted(env or {}))
    result_file = result_path(payload_path)
    result_file.unlink(missing_ok=True)  # never report a previous attempt's metrics
    process_env = dict(os.environ, PYTHONUNBUFFERED="1", **launcher_env(launch))
    process_env.update(env or {})

    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    first_user_error = None  # workers print user-facing errors as one "error: ..." line
    with open(log_path, "a") as log:
        log.write(f"# {' '.join(command)}\n")
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
    if not result_file.exists():
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

