"""The Slurm executor: a stage runs as one batch job; `vlflow run` stays on the login node, waits, and commits.

sbatch rather than submitit: the job must run vlflow's own per-stage entry point (`vlflow.executors.job`, which runs
`vlflow.execute` or the distributed launcher exactly as the local runner does) from a payload file the runner already
wrote, and vlflow needs the job's output file streamed live, its final state (PREEMPTED, NODE_FAIL, OUT_OF_MEMORY...)
and `--signal`; submitit pickles a Python callable, keeps its own folder layout and result protocol, and would add a
dependency for what is one `sbatch --parsable` call plus `scontrol show job` polling. Every Slurm command runs under
coreutils' `timeout`, so a dead controller is an error after `controller_timeout_s`, never a hang.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlflow.errors import StageError, VlflowError
from vlflow.executors.preempt import RESUBMIT_EXIT_CODE
from vlflow.executors.spec import ExecutorSpec

# Final states Slurm can report; anything else (PENDING, RUNNING, CONFIGURING, COMPLETING, REQUEUED, ...) is not final.
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
RESUBMITTED_STATES = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}  # not the stage's fault: run it again (bounded)
# Polling: every POLL_FIRST_S during the first POLL_FAST_FOR_S of a job (short stages end quickly: the overhead per
# stage stays small), then backing off to POLL_MAX_S (long jobs: few requests to the controller).
POLL_FIRST_S, POLL_FAST_FOR_S, POLL_MAX_S = 0.25, 10.0, 3.0
LOG_TAIL_LINES = 15

_submitted: set[str] = set()  # job ids of this process still running, cancelled on Ctrl-C / SIGTERM
_submitted_lock = threading.Lock()


def cancel_submitted_jobs(timeout_s: float = 10.0) -> list[str]:
    """scancel every job this process submitted and has not seen finish (the runner calls it on Ctrl-C/SIGTERM)."""
    with _submitted_lock:
        jobs = sorted(_submitted)
        _submitted.clear()
    if jobs and shutil.which("scancel"):
        try:
            subprocess.run(["timeout", "-k", "2", str(timeout_s), "scancel", *jobs], capture_output=True,
                           timeout=timeout_s + 5)
        except (OSError, subprocess.TimeoutExpired):
            pass  # nothing more can be done from here; the message names them
        print(f"cancelled Slurm job(s) {', '.join(jobs)}", file=sys.stderr, flush=True)
    return jobs


def is_under(path: str | Path, folders: list[str]) -> bool:
    real = Path(path).resolve()
    return any(real == Path(f).resolve() or Path(f).resolve() in real.parents for f in folders)


def check_can_submit(stages: list, cache_url: str, cache_is_local: bool, state_dir: Path) -> None:
    """Before anything runs: sbatch exists, and the cache and state dir are visible to the compute nodes.

    `stages`: the StageDecls of the run that execute on Slurm. A local path cannot be proven shared from here, so
    it has to be declared (executor.shared_dirs) or the cache must be an object store URL."""
    if not stages:
        return
    for decl in stages:
        shared = decl.executor.shared_dirs
        hint = ("declare it shared in executor.shared_dirs (or [executor] shared_dirs in vlflow.toml), listing a "
                "directory that the login node and every compute node mount at the same path")
        if not is_under(state_dir, shared):
            raise StageError(f"stage {decl.name} runs on Slurm, but the state dir {state_dir} (where the job writes "
                             f"its output, logs and checkpoints) is not declared shared: {hint}",
                             file=decl.file, line=decl.line, field=f"stages.{decl.name}.executor.shared_dirs")
        if cache_is_local and not is_under(cache_url.removeprefix("file://"), shared):
            raise StageError(f"stage {decl.name} runs on Slurm, but the cache {cache_url} is a local path that is "
                             f"not declared shared: {hint}; or use an object store cache URL (s3://...)",
                             file=decl.file, line=decl.line, field=f"stages.{decl.name}.executor.shared_dirs")
    first = stages[0]
    if shutil.which("sbatch") is None:
        raise StageError(f"stage {first.name} runs on Slurm (executor.type: slurm) but `sbatch` is not on PATH: run "
                         "vlflow on a Slurm login node (or install slurm-client), or use executor.type: local",
                         file=first.file, line=first.line, field=f"stages.{first.name}.executor")


@dataclass
class JobState:
    state: str  # JobState, e.g. RUNNING, COMPLETED; "CANCELLED" also for "CANCELLED by 0"
    exit_code: int  # of the batch script (ExitCode=a:b gives a)
    signal: int  # the b of ExitCode=a:b
    reason: str


def parse_job(text: str) -> JobState | None:
    """The state of `scontrol show job -o ID` output (one line of Key=Value pairs)."""
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    if "JobState" not in fields:
        return None
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return JobState(fields["JobState"], int(code or 0), int(sig or 0), fields.get("Reason", "None"))


class SlurmExecutor:
    """Runs a stage's entry point as a batch job and waits for it; `run` returns the stage's metrics."""

    def __init__(self, spec: ExecutorSpec, python: str = sys.executable, env: dict | None = None):
        self.spec = spec
        self.python = python
        self.env = dict(os.environ if env is None else env)

    # ---- Slurm commands ----------------------------------------------------------------------------------------
    def _slurm(self, *command: str) -> subprocess.CompletedProcess:
        """A Slurm client command under `timeout`; rc 124 when the controller did not answer in time."""
        limit = self.spec.controller_timeout_s
        try:
            return subprocess.run(["timeout", "-k", "2", str(limit), *command], capture_output=True, text=True,
                                  env=self.env, timeout=limit + 10)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, 124, "", "timed out")

    def sbatch_options(self, name: str, output: Path, state_dir: Path | None = None) -> list[str]:
        spec = self.spec
        options = [f"--job-name={name}", f"--output={output}", f"--nodes={spec.nodes}", "--ntasks-per-node=1",
                   "--export=ALL", f"--chdir={os.getcwd()}", "--parsable"]
        if state_dir is not None:
            options.append(f"--comment={state_tag(state_dir)}")
        if spec.signal_seconds:
            options.append(f"--signal=B:USR1@{spec.signal_seconds}")  # to the batch shell, which forwards it
        for flag, value in (("partition", spec.partition), ("cpus-per-task", spec.cpus_per_task), ("mem", spec.mem),
                            ("time", spec.time), ("account", spec.account), ("qos", spec.qos),
                            ("constraint", spec.constraint)):
            if value is not None:
                options.append(f"--{flag}={value}")
        if spec.gpus_per_node:
            options.append(f"--gpus-per-node={spec.gpus_per_node}")
        return [*options, *spec.extra_args]

    def job_script(self, payload_path: Path) -> str:
        """The batch script: the stage's entry point in the background, so the shell can pass Slurm's warning
        signal (USR1, see --signal) on to it; `wait` returns early on a trapped signal, hence the loop."""
        command = shlex.join([self.python, "-m", "vlflow.executors.job", str(payload_path)])
        return ("#!/bin/bash\n"
                "trap 'kill -USR1 $stage 2>/dev/null' USR1\n"
                "trap 'kill -TERM $stage 2>/dev/null' TERM\n"
                f"{command} &\n"
                "stage=$!\n"
                "while :; do wait $stage; rc=$?; kill -0 $stage 2>/dev/null || break; done\n"
                "exit $rc\n")

    def submit(self, name: str, script: Path, output: Path, log, state_dir: Path | None = None) -> str:
        command = ["sbatch", *self.sbatch_options(name, output, state_dir), str(script)]
        log.write(f"# {shlex.join(command)}\n")
        log.flush()
        try:
            done = self._slurm(*command)
        except FileNotFoundError:
            raise VlflowError("`sbatch` (or `timeout`) is not on PATH: run vlflow on a Slurm login node") from None
        if done.returncode == 124:
            raise VlflowError(f"sbatch got no answer from the Slurm controller within "
                              f"{self.spec.controller_timeout_s:g}s (executor.controller_timeout_s): is slurmctld "
                              "running and SLURM_CONF right?")
        job_id = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not job_id.isdigit():
            raise VlflowError(f"sbatch refused the job: {(done.stderr or done.stdout).strip()[-500:]}")
        with _submitted_lock:
            _submitted.add(job_id)
        return job_id

    def cancel(self, job_id: str) -> None:
        self._slurm("scancel", job_id)
        with _submitted_lock:
            _submitted.discard(job_id)

    def query(self, job_id: str) -> JobState | None:
        """The job's state; None when the controller did not answer. A job already purged from the controller's
        memory (MinJobAge) is reported as state UNKNOWN."""
        done = self._slurm("scontrol", "show", "job", "-o", job_id)
        if done.returncode == 0:
            return parse_job(done.stdout) or JobState("UNKNOWN", 0, 0, "no JobState in scontrol's answer")
        if "Invalid job id" in done.stderr:
            return JobState("UNKNOWN", 0, 0, "the controller no longer knows the job (MinJobAge passed)")
        return None

    # ---- one stage -----------------------------------------------------------------------------------------------
    def run(self, stage: str, payload_path: Path, log_path: Path, job_name: str, where: dict,
            on_line: Callable[[str], None] = lambda line: None,
            on_note: Callable[[str], None] = lambda text: None, state_dir: Path | None = None) -> dict | None:
        """Submit, stream the job's output into `log_path` (and `on_line`), wait, and map the final state.

        Raises StageError naming the job id when the job does not complete; resubmits (at most `max_resubmits`
        times) after preemption, node failure, or the stage's checkpoint-and-exit on the warning signal."""
        from vlflow.payload import result_path

        staging = Path(payload_path).parent
        script = staging / "job.sh"
        script.write_text(self.job_script(Path(payload_path)))
        result_path(Path(payload_path)).unlink(missing_ok=True)
        attempts = 0
        with open(log_path, "a") as log:
            while True:
                output = staging / f"slurm-{attempts}.out"
                output.unlink(missing_ok=True)
                try:
                    job_id = self.submit(job_name, script, output, log, state_dir)
                except VlflowError as exc:
                    raise StageError(f"stage {stage}: {exc.message}", **where) from None
                on_note(f"submitted Slurm job {job_id}")
                log.write(f"# Slurm job {job_id}\n")
                log.flush()
                try:
                    final = self.wait(job_id, output, log, on_line)
                except VlflowError as exc:  # the controller stopped answering
                    self.cancel(job_id)
                    raise StageError(f"stage {stage}: {exc.message}", **where) from None
                except BaseException:
                    self.cancel(job_id)  # an error while waiting, or the thread told to stop: no orphan job
                    raise
                with _submitted_lock:
                    _submitted.discard(job_id)
                resubmit = final.state in RESUBMITTED_STATES or (
                    final.state in ("FAILED", "TIMEOUT") and final.exit_code == RESUBMIT_EXIT_CODE)
                if final.state == "COMPLETED" and final.exit_code == 0:
                    break
                if resubmit and attempts < self.spec.max_resubmits:
                    attempts += 1
                    why = "checkpointed on Slurm's warning signal" if final.exit_code == RESUBMIT_EXIT_CODE \
                        else final.state
                    text = (f"Slurm job {job_id} ended ({why}); resubmitting "
                            f"({attempts}/{self.spec.max_resubmits}), the stage resumes from its checkpoint")
                    log.write(f"# {text}\n")
                    log.flush()
                    on_note(text)
                    continue
                raise StageError(self.failure_message(stage, job_id, final, log_path, resubmit), **where)
        result = result_path(Path(payload_path))
        return json.loads(result.read_text()) if result.exists() else None

    def wait(self, job_id: str, output: Path, log, on_line: Callable[[str], None]) -> JobState:
        """Poll until the job is in a final state, copying new lines of its output file to the log meanwhile."""
        offset, partial = 0, ""
        interval = POLL_FIRST_S
        submitted = last_answer = time.monotonic()

        def copy_output() -> None:
            nonlocal offset, partial
            try:
                with open(output, "rb") as f:
                    if os.fstat(f.fileno()).st_size < offset:  # requeued by Slurm: the file starts again
                        offset, partial = 0, ""
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:  # not started yet
                return
            offset += len(data)
            text = partial + data.decode(errors="replace")
            *lines, partial = text.split("\n")
            for line in lines:
                log.write(line + "\n")
                on_line(line)
            log.flush()

        while True:
            copy_output()
            state = self.query(job_id)
            if state is None:
                if time.monotonic() - last_answer > self.spec.controller_timeout_s:
                    raise VlflowError(f"the Slurm controller did not answer for {self.spec.controller_timeout_s:g}s "
                                      f"while waiting for job {job_id} (executor.controller_timeout_s)")
            else:
                last_answer = time.monotonic()
                if state.state.split()[0] in FINAL_STATES or state.state == "UNKNOWN":
                    time.sleep(0.1)  # the last lines can land in the file just after the state changes
                    copy_output()
                    if partial:
                        log.write(partial + "\n")
                        on_line(partial)
                    return state
            time.sleep(interval)
            if time.monotonic() - submitted > POLL_FAST_FOR_S:
                interval = min(interval * 1.5, POLL_MAX_S)

    def failure_message(self, stage: str, job_id: str, final: JobState, log_path: Path, resubmitted: bool) -> str:
        lines = log_path.read_text(errors="replace").splitlines()
        user_error = next((line[len("error: "):] for line in lines if line.startswith("error: ")), None)
        spec = self.spec
        what = {
            "FAILED": f"failed with exit code {final.exit_code}",
            "TIMEOUT": f"hit its time limit (executor.time: {spec.time or 'the partition default'})",
            "CANCELLED": "was cancelled (scancel, or by an administrator); rerun vlflow to resume",
            "OUT_OF_MEMORY": f"ran out of memory (executor.mem: {spec.mem or 'the partition default'})",
            "NODE_FAIL": "lost its node (NODE_FAIL)",
            "PREEMPTED": "was preempted",
            "UNKNOWN": "ended in a state the controller no longer knows",
        }.get(final.state.split()[0], f"ended in state {final.state} ({final.reason})")
        if resubmitted:
            what += f", after {spec.max_resubmits} resubmission(s) (executor.max_resubmits)"
        headline = f": {user_error}" if user_error else ""
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return (f"stage {stage}: Slurm job {job_id} {what}{headline}\n"
                f"--- last {min(len(lines), LOG_TAIL_LINES)} lines of {log_path} ---\n{tail}")


def job_name(workflow: str, stage: str) -> str:
    """Masked (a sweep entry's name holds its values, which may be secrets): squeue shows job names to every user."""
    from vlflow.secrets import mask

    return mask(f"vlflow-{workflow}-{stage}")


def state_tag(state_dir: Path) -> str:
    """The --comment of the jobs of runs with this state dir (a digest: a path may hold spaces)."""
    import hashlib

    return "vlflow-" + hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]


def active_jobs(names: list[str], state_dir: Path, timeout_s: float = 10.0) -> dict[str, list[str]]:
    """Job name -> ["<id> <STATE> <nodes or reason>", ...] of this user's queued or running jobs with those names,
    submitted by runs with this state dir; empty when Slurm is not installed or does not answer within `timeout_s`
    (status must never hang)."""
    if not names or shutil.which("squeue") is None:
        return {}
    try:
        done = subprocess.run(["timeout", "-k", "2", str(timeout_s), "squeue", "-h", "--me",
                               f"--name={','.join(names)}",
                               "-o", "%j|%i|%T|%k|%R"], capture_output=True, text=True, timeout=timeout_s + 5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, list[str]] = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        name, job_id, state, comment, where = (line.split("|", 4) + ["", "", "", ""])[:5]
        if comment != state_tag(state_dir):
            continue
        found.setdefault(name, []).append(f"job {job_id} {state} {where}".strip())
    return found
