"""User-facing errors: one paragraph naming where the problem is, printed without a traceback by the CLI.

    raise WorkflowError("expected an integer, got 'abc'", file="workflows/x.yaml", line=12,
                        field="stages.train.with.max_steps")
    # str(): workflows/x.yaml:12: stages.train.with.max_steps: expected an integer, got 'abc'
"""
from __future__ import annotations


class VlflowError(Exception):
    """Base of every error caused by user input or the environment (not by a bug in vlflow)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field

    @property
    def location(self) -> str:
        """`file:line` (or just `file`), empty when unknown."""
        if self.file is None:
            return f"line {self.line}" if self.line is not None else ""
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        parts = [part for part in (self.location, self.field) if part]
        return ": ".join([*parts, self.message])

    def __reduce__(self):  # keep file/line/field when pickled across processes
        return (_rebuild, (type(self), self.message, self.file, self.line, self.field))


def _rebuild(cls, message, file, line, field):
    return cls(message, file=file, line=line, field=field)


class WorkflowError(VlflowError):
    """A workflow file (or an override) is malformed or inconsistent."""


class StoreError(VlflowError):
    """The artifact store cannot be read or written, or holds a corrupt artifact."""


class StageError(VlflowError):
    """A stage failed or rejected its inputs."""


class LaunchError(VlflowError):
    """A distributed launch could not be set up or its workers failed."""


class LockError(VlflowError):
    """Another vlflow process holds the lock on a stage or the store."""
