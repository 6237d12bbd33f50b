"""Slurm's warning signal, from the batch job down to the training loop.

The job asks for SIGUSR1 before its time limit (`--signal=B:USR1@secs`); the batch shell passes it to
`vlflow.executors.job`, which passes it to the stage's processes. A training loop that sees it (every rank agreeing
on the same step) saves a checkpoint and stops; the job then exits with RESUBMIT_EXIT_CODE and the login-side
executor submits the stage again, which resumes from that checkpoint.

USR1 is *blocked* (not handled) from the job entry point down: a blocked signal stays pending, is inherited across
fork and exec, and neither kills a process that has no handler yet (a rank still importing torch, the torchrun agent)
nor gets lost: `PreemptionNotice` unblocks it once the loop can act on it.
"""
from __future__ import annotations

import os
import signal

PREEMPTIBLE_ENV = "VLFLOW_PREEMPTIBLE"  # set in a job's environment: its training loops watch for the signal
RESUBMIT_EXIT_CODE = 75  # the job checkpointed on the warning: submit it again (EX_TEMPFAIL, "try again later")
WARNING_SIGNAL = signal.SIGUSR1


class PreemptionNotice:
    """Watches for Slurm's warning signal in a training loop (main thread only). `requested(device)` is collective:
    every rank calls it at the same step and all get the same answer."""

    def __init__(self) -> None:
        self.signalled = False
        signal.signal(WARNING_SIGNAL, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {WARNING_SIGNAL})  # a pending one is delivered right here

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self, device) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signalled
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def preemption_notice() -> PreemptionNotice | None:
    """A notice when this process runs inside a Slurm job of vlflow's executor, else None (no cost locally)."""
    return PreemptionNotice() if os.environ.get(PREEMPTIBLE_ENV) else None


class Preempted(SystemExit):
    """Raised by a training loop that checkpointed on the warning signal; the process exits with its code."""

    def __init__(self) -> None:
        super().__init__(RESUBMIT_EXIT_CODE)
