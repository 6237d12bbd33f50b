"""The error raised for bad data or bad input files (printed without a traceback by the CLI)."""
from __future__ import annotations

from vlflow.errors import StageError


class DataError(StageError):
    """Input data is missing, malformed or fails verification; the message names the file and field."""
