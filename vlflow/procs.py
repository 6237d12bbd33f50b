"""Child processes die with their parent, so a killed `vlflow run` never leaves a stage (or a training rank) running
beside the next run — which would otherwise write into the same work dir once the cache lock is free again."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_command: tuple[str, ...] = ()) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; a no-op elsewhere).

    Usable as `preexec_fn` of subprocess.Popen and at the start of a child's main. A child that calls it only after
    starting up may already have lost its parent and been adopted by init or a subreaper; with `parent_command` (words
    one of which the parent's command line must contain, e.g. torchrun's module name) that case is caught too."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent or (parent_command and not _command_has(parent, parent_command)):
        os.kill(os.getpid(), signal.SIGKILL)  # the parent died before the request took effect


def _command_has(pid: int, words: tuple[str, ...]) -> bool:
    command = command_line(pid)
    if command is None:
        return True  # cannot tell (no /proc): keep running rather than kill a healthy rank
    return any(word in command for word in words)


def command_line(pid: int) -> str | None:
    """A process's command line, arguments joined by spaces (empty for a zombie); None when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes other than this one whose command line contains `text`: pid -> command line (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            command = command_line(int(entry.name))
            if command and text in command:
                found[int(entry.name)] = command
    return found
