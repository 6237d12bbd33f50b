"""Where a stage's process runs: on this machine (`local`) or as a Slurm batch job (`slurm`).

The runner prepares a stage's payload and staging dir and commits its output afterwards, once; an executor only runs
the stage's entry point (`vlflow.execute`, or the distributed launcher) somewhere and returns its metrics, raising a
VlflowError on failure. Light imports only: the runner imports this module.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlflow.executors.spec import ExecutorSpec

__all__ = ["ExecutorSpec", "StageJob", "LocalExecutor", "executor_for"]


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


class LocalExecutor:
    """Today's behaviour: a child process of `vlflow run` (`run_process`, the runner's own), or the distributed
    launcher on this machine."""

    def __init__(self, run_process: Callable):
        self.run_process = run_process

    def run(self, job: StageJob) -> dict | None:
        if job.spec.distributed:
            from vlflow.launch import run_distributed

            return run_distributed(job.spec, job.payload_path, job.decl.launch, job.log_path, on_line=job.on_line)
        return self.run_process(job.decl, job.payload_path, job.log_path)


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


def executor_for(spec: ExecutorSpec, run_process: Callable, python: str = sys.executable):
    return SlurmStageExecutor(spec, python) if spec.is_slurm else LocalExecutor(run_process)
