"""Where a stage's process runs: on this machine (`local`) or as a Slurm batch job (`slurm`).

`vlflow.executors.execution` prepares a stage's payload and staging dir and commits its output afterwards, once; an
executor only runs the stage's entry point (`vlflow.execute`, or the distributed launcher) somewhere and returns its
metrics, raising a VlflowError on failure. Light imports only: the runner imports this module.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlflow.executors.spec import ExecutorSpec

__all__ = ["ExecutorSpec", "StageJob", "executor_for"]


@dataclass
class StageJob:
    """One execution of a stage, as the runner prepared it."""
    decl: object  # vlflow.workflow.StageDecl
    spec: object  # vlflow.stage.StageSpec
    payload_path: Path
    log_path: Path
    workflow: str
    on_line: Callable[[str], None]  # each line the stage prints
    on_note: Callable[[str], None]  # what the executor itself reports (job submitted, resubmitted)
    state_dir: Path | None = None  # of the run: tags its Slurm jobs so that `vlflow status` finds its own
    payload_secrets: dict | None = None  # clear values of a sealed payload's placeholders (vlflow.payload.SECRETS_ENV)


class SlurmStageExecutor:
    def __init__(self, spec: ExecutorSpec, python: str):
        from vlflow.executors.slurm import SlurmExecutor

        self.slurm = SlurmExecutor(spec, python=python)

    def run(self, job: StageJob) -> dict | None:
        decl = job.decl
        where = {"file": decl.file, "line": decl.line}
        from vlflow.executors.slurm import job_name

        return self.slurm.run(decl.name, job.payload_path, job.log_path, job_name(job.workflow, decl.name),
                              where, on_line=job.on_line, on_note=job.on_note, state_dir=job.state_dir)


def executor_for(spec: ExecutorSpec, python: str = sys.executable):
    if spec.is_slurm:
        return SlurmStageExecutor(spec, python)
    from vlflow.executors.local import LocalExecutor

    return LocalExecutor(python)
