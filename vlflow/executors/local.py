"""Runs one stage's process on this machine: a one-process stage forked from the warm server (or a fresh
interpreter, vlflow.executors.forked), a distributed stage under its launcher (vlflow.launch)."""
from __future__ import annotations

import json
import sys

from vlflow.errors import StageError
from vlflow.payload import SECRETS_ENV, result_path


class LocalExecutor:
    """A child process of `vlflow run`, or the distributed launcher on this machine; returns the stage's metrics."""

    def __init__(self, python: str = sys.executable):
        self.python = python

    def run(self, job) -> dict | None:  # job: vlflow.executors.StageJob
        if job.spec.distributed:
            from vlflow.launch import run_distributed

            # A sealed payload's secrets go to the launcher and its ranks in the environment, never to the disk.
            env = {SECRETS_ENV: json.dumps(job.payload_secrets)} if job.payload_secrets else None
            return run_distributed(job.spec, job.payload_path, job.decl.launch, job.log_path, env=env,
                                   on_line=job.on_line)
        from vlflow.executors.forked import run_stage_process  # forked from a warm server, or a fresh interpreter

        decl = job.decl
        rc = run_stage_process(job.payload_path, job.log_path, job.on_line, python=self.python)
        if rc != 0:
            tail = "".join(job.log_path.read_text().splitlines(keepends=True)[-15:])
            raise StageError(f"stage {decl.name} ({decl.uses}) failed with exit code {rc}; log: {job.log_path}\n{tail}",
                             file=decl.file, line=decl.line)
        result = result_path(job.payload_path)
        return json.loads(result.read_text()) if result.exists() else None
