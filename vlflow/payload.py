"""What the runner hands a stage process: one typed `StagePayload`, written once by the runner, parsed once by the
stage process (`vlflow.execute`, the distributed worker, a Slurm job).

A payload can hold secrets (a password in a URL param). A one-process local stage reads it from a FIFO at the
payload path (`PayloadPipe`): the bytes pass through the kernel and never reach the disk. Where other processes read
it later, or several times (the launcher and the ranks of a distributed stage, a Slurm job that may be resubmitted),
it is a file created 0600, which the runner removes when the stage ends. A local distributed stage's file holds
placeholders instead of its secret values (`StagePayload.sealed`), whose clear values reach the launcher and every
rank in one environment variable (SECRETS_ENV) and are put back by `unsealed`. Light imports only (pydantic and
vlflow.stage, no torch): the stage process imports this before its stage's own modules.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vlflow.errors import LaunchError
from vlflow.stage import LaunchSpec

# The clear values of a sealed payload's secrets, a JSON map placeholder -> value: set for the launcher only (never
# on a command line, never logged), inherited by torchrun's ranks, exported by mpirun (`-x`), forwarded by srun.
SECRETS_ENV = "VLFLOW_PAYLOAD_SECRETS"
PLACEHOLDER_PREFIX = "vlflow-secret:"


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

    def sealed(self, masked_params: dict[str, Any]) -> tuple["StagePayload", dict[str, Any]]:
        """This payload with every param value that `masked_params` (its params as the cache records them) masks
        replaced by a placeholder, and the map placeholder -> clear value that `unsealed` takes back."""
        nonce, clear = secrets.token_hex(8), {}

        def seal(value, masked):
            if isinstance(value, dict) and isinstance(masked, dict) and value.keys() == masked.keys():
                return {key: seal(value[key], masked[key]) for key in value}
            if isinstance(value, list) and isinstance(masked, list) and len(value) == len(masked):
                return [seal(item, masked_item) for item, masked_item in zip(value, masked)]
            if value == masked:
                return value
            placeholder = f"{PLACEHOLDER_PREFIX}{nonce}:{len(clear)}"
            clear[placeholder] = value
            return placeholder

        return self.model_copy(update={"params": seal(self.params, masked_params)}), clear

    def unsealed(self, clear: dict[str, Any] | None = None) -> "StagePayload":
        """The payload with its placeholders replaced by their clear values: from `clear`, else taken out of this
        process's environment (SECRETS_ENV is removed from it, so that the stage's code and its children never see
        it). A placeholder without a value is an error: the params would be wrong."""
        if clear is None:
            clear = json.loads(os.environ.pop(SECRETS_ENV, None) or "{}")
        missing = []

        def unseal(value):
            if isinstance(value, dict):
                return {key: unseal(item) for key, item in value.items()}
            if isinstance(value, list):
                return [unseal(item) for item in value]
            if isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX):
                if value not in clear:
                    missing.append(value)
                return clear.get(value, value)
            return value

        params = unseal(self.params)
        if missing:
            raise LaunchError(f"stage {self.stage}: {len(missing)} secret param value(s) of the payload did not reach "
                              f"this process ({SECRETS_ENV} is not set or stale; a node joining by hand gets no "
                              "secrets, see docs/CLUSTER.md)", field="params")
        return self.model_copy(update={"params": params}) if clear else self

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
