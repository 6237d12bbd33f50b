"""What the runner hands a stage process: one typed `StagePayload`, written once by the runner, parsed once by the
stage process (`vlflow.execute`, the distributed worker, a Slurm job).

A payload can hold secrets (a password in a URL param). A one-process local stage reads it from a FIFO at the
payload path (`PayloadPipe`): the bytes pass through the kernel and never reach the disk. Where other processes read
it later, or several times (the launcher and the ranks of a distributed stage, a Slurm job that may be resubmitted),
it is a file created 0600, which the runner removes when the stage ends. Light imports only (pydantic and
vlflow.stage, no torch): the stage process imports this before its stage's own modules.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vlflow.stage import LaunchSpec


class StagePayload(BaseModel):
    """One execution of one stage, as its process needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str  # the stage's name in the workflow (a sweep entry's full name)
    uses: str  # its stage type
    params: dict[str, Any]  # validated and dumped params, `${stages.S.output}` replaced by local paths
    inputs: dict[str, Path]  # input name -> local file or directory
    output_dir: Path
    work_dir: Path | None = None  # resumable stages: checkpoints that survive a failed attempt
    launch: LaunchSpec | None = None  # distributed stages
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    spec_source: str | None = None  # the module defining `uses` (vlflow.stage.spec_source): imported alone

    def write(self, path: Path) -> Path:
        """Write the payload to `path` (a new file, mode 0600 from the start: never readable by others)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> "StagePayload":
        """Parse the payload at `path` (a file, or the FIFO of a PayloadPipe)."""
        return cls.model_validate_json(Path(path).read_bytes())

    @classmethod
    def of(cls, value: "StagePayload | dict") -> "StagePayload":
        """A payload from a parsed JSON document (the distributed launcher and worker read the file as JSON)."""
        return value if isinstance(value, cls) else cls.model_validate(value)


class PayloadPipe:
    """Hands a payload to the one process that reads `path`, through a FIFO (mode 0600): nothing is written to disk.

    A thread writes it once the reader has opened the FIFO; `close` (after the stage process has ended) releases the
    thread if the process never read it (it died first) and removes the FIFO."""

    def __init__(self, payload: StagePayload, path: Path):
        self.path = Path(path)
        self.data = payload.model_dump_json(indent=1).encode()
        os.mkfifo(self.path, 0o600)
        self.thread = threading.Thread(target=self._feed, daemon=True, name=f"payload:{self.path.parent.name}")
        self.thread.start()

    def _feed(self) -> None:
        try:
            with open(self.path, "wb") as fifo:  # blocks until the stage process opens it
                fifo.write(self.data)
        except OSError:  # BrokenPipeError: released by close() without a reader
            pass

    def close(self) -> None:
        if self.thread.is_alive():  # no reader came (the stage died first): be the reader, so the writer finishes
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                fd = None
            try:
                while self.thread.is_alive():
                    if fd is not None:
                        try:
                            os.read(fd, 1 << 16)  # drained and dropped
                        except BlockingIOError:
                            pass
                    self.thread.join(0.01)
            finally:
                if fd is not None:
                    os.close(fd)
        self.path.unlink(missing_ok=True)


def result_path(payload_path: Path) -> Path:
    """Where the stage process writes its metrics (beside the payload; it exists only if the stage succeeded)."""
    return Path(payload_path).with_name(Path(payload_path).name + ".result.json")


def write_result(payload_path: Path, metrics: dict | None) -> None:
    tmp = result_path(payload_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics or {}, default=float))
    tmp.replace(result_path(payload_path))
