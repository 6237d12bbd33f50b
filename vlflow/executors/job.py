"""What a Slurm batch job runs: `python -m vlflow.executors.job payload.json`.

The same per-stage entry point as on the login node: `vlflow.execute` for a one-process stage, the distributed
launcher (torchrun / mpirun / srun per the stage's `launch`) for a distributed one. Output goes to the job's output
file, which the login-side executor streams into the stage log; the artifact is committed there, once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from vlflow.executors.preempt import PREEMPTIBLE_ENV, RESUBMIT_EXIT_CODE, WARNING_SIGNAL


def descendants(root: int) -> list[int]:
    """Every live process below `root` (Linux /proc): the launcher, its agents and ranks, in any session."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class WarningRelay:
    """Passes Slurm's warning signal from this process to every process of the stage (see vlflow.executors.preempt).

    The signal is blocked here before the launcher starts, so every process inherits it blocked; a thread takes it
    with sigwait and sends it on; the training loop of each rank unblocks it when it can act on it."""

    def __init__(self) -> None:
        self.signalled = False
        signal.pthread_sigmask(signal.SIG_BLOCK, {WARNING_SIGNAL})
        threading.Thread(target=self._relay, daemon=True, name="slurm-warning-relay").start()

    def _relay(self) -> None:
        while True:
            signal.sigwait({WARNING_SIGNAL})
            self.signalled = True
            print("vlflow: Slurm's warning signal arrived: the stage checkpoints and stops", flush=True)
            for pid in descendants(os.getpid()):
                try:
                    os.kill(pid, WARNING_SIGNAL)
                except ProcessLookupError:
                    pass
            if os.environ.get("SLURM_JOB_ID"):  # ranks started by srun are slurmstepd's children, on every node
                subprocess.run(["timeout", "10", "scancel", f"--signal={WARNING_SIGNAL.name.removeprefix('SIG')}",
                                os.environ["SLURM_JOB_ID"]], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    payload_path = Path(argv[0])
    from vlflow.payload import StagePayload
    from vlflow.stage import get_spec

    spec = get_spec(StagePayload.read(payload_path).uses)
    if not spec.distributed:
        from vlflow.execute import main as execute

        signal.signal(WARNING_SIGNAL, signal.SIG_IGN)  # no checkpoint to make: run on until the time limit

        return execute([str(payload_path)])
    from vlflow.errors import VlflowError
    from vlflow.launch import run_distributed

    # Inside the allocation: srun/mpirun take rank 0's address from its first node (vlflow.launch.command)
    relay = WarningRelay()
    try:
        sys.stdout.flush()  # the launcher's lines go to the same file (the job's output), after ours
        run_distributed(spec, payload_path, None, Path("/dev/stdout"), env={PREEMPTIBLE_ENV: "1"})
    except VlflowError as exc:
        if relay.signalled:  # the ranks stopped at a checkpoint (or died before one): resume from the latest
            print(f"vlflow: stopped on Slurm's warning signal; exit code {RESUBMIT_EXIT_CODE} asks for a "
                  "resubmission", flush=True)
            return RESUBMIT_EXIT_CODE
        print(f"error: {str(exc).splitlines()[0]}", flush=True)  # its log tail is in this output already
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
