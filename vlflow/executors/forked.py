"""Starts a non-distributed stage's process on this machine: forked from a warm server (default) or a fresh interpreter.

A fresh `python -m vlflow.execute` costs ~100 ms of interpreter start and imports per stage. By default the stage
process is instead forked from Python's multiprocessing forkserver: one clean server process, started once per run
with the vlflow modules a stage process needs and every stage spec module already imported (never torch, never a
stage's entry module), forks a child per stage in a few ms. The server holds no runner state (it is a fresh
interpreter, not a fork of the runner), so a stage starts as clean as before. The child keeps every guarantee of the
fresh interpreter:
- its stdout and stderr go to a pipe the runner copies into the stage log, line by line, as before;
- it leads its own process group (`os.setsid`), so the runner's kill reaches everything the stage started;
- it dies with its parent (PR_SET_PDEATHSIG); the server exits as soon as the runner is gone (its pipe closes), so a
  killed runner leaves no stage behind;
- its exit code means what the interpreter's meant: 0 done, 2 a user-facing error, 1 a traceback, -N killed by signal N;
- its command line (setproctitle) reads `python -m vlflow.execute PAYLOAD`, as before;
- it gets the runner's environment and working directory as they are when the stage starts.
Stages whose spec imports torch pay that import in the child, as before; the runner process never imports it.

`VLFLOW_STAGE_PROCESS=spawn` falls back to a fresh interpreter per stage (`python -m vlflow.execute`); it is also used
when the runner was asked for another interpreter than its own and where the platform has no forkserver.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from multiprocessing import reduction, spawn
from pathlib import Path
from typing import Callable

from vlflow.errors import VlflowError
from vlflow.procs import die_with_parent

STAGE_PROCESS_ENV = "VLFLOW_STAGE_PROCESS"
MODES = ("forkserver", "spawn")
# Imported once by the server so that each forked stage has them already. Light engine modules only: never torch.
STAGE_PRELOAD = ["vlflow.execute", "vlflow.stage", "vlflow.errors", "vlflow.procs", "vlflow.executors.forked",
                 "pydantic", "logging", "json", "traceback"]

STAGE_PROCESS_NAME = "vlflow-stage"

_start_lock = threading.Lock()
_context: multiprocessing.context.BaseContext | None = None


def stage_process_mode(python: str = sys.executable) -> str:
    """How this run starts stage processes: "forkserver" or "spawn" (see the module docstring)."""
    mode = os.environ.get(STAGE_PROCESS_ENV, "").strip() or "forkserver"
    if mode not in MODES:
        raise VlflowError(f"{STAGE_PROCESS_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "forkserver" and (python != sys.executable
                                 or "forkserver" not in multiprocessing.get_all_start_methods()):
        return "spawn"
    return mode


def _forkserver() -> multiprocessing.context.BaseContext:
    global _context
    with _start_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(STAGE_PRELOAD + _spec_modules())
            spawn.get_preparation_data = _stage_needs_no_main(spawn.get_preparation_data)
            _context = context
    return _context


def _spec_modules() -> list[str]:
    """The modules declaring stage types: light by contract (no torch; the runner itself imports every one of them
    to plan), and importing its spec is a good part of a trivial stage's time. Entry modules are never preloaded."""
    from vlflow.stage import registry, spec_source

    return sorted({source.partition(":")[0] for source in map(spec_source, registry()) if source})


def _stage_needs_no_main(get_preparation_data: Callable) -> Callable:
    """multiprocessing re-imports the parent's `__main__` script in each child (for targets defined there). A stage's
    target lives in this module, and re-running a caller's script without a `__name__` guard would run its workflow
    again inside the stage: stage processes (by their name) skip that step; other processes keep it."""

    def preparation_data(name: str) -> dict:
        data = get_preparation_data(name)
        if name.startswith(STAGE_PROCESS_NAME):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    return preparation_data


class _InheritedFd:
    """A file descriptor handed to the forked child (multiprocessing sends it over the server's unix socket)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _InheritedFd._rebuild, (reduction.DupFd(self.fd),)

    @staticmethod
    def _rebuild(dup) -> "_InheritedFd":
        return _InheritedFd(dup.detach())


def _stage_main(payload_path: str, output: _InheritedFd, environ: dict[str, str], cwd: str) -> None:
    """The forked child: become what `python -m vlflow.execute payload` was, then run it."""
    os.setsid()  # own process group: the runner's killpg reaches whatever the stage starts
    try:  # the command line a fresh interpreter had: ps, and checks that no stage outlived its run, find it
        from setproctitle import setproctitle

        setproctitle(f"{sys.executable} -m vlflow.execute {payload_path}")
    except ImportError:
        pass
    die_with_parent()
    os.dup2(output.fd, 1)
    os.dup2(output.fd, 2)
    os.close(output.fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # lines reach the log as they are printed, like PYTHONUNBUFFERED
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    from vlflow.execute import main

    code = main([payload_path])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def run_stage_process(payload_path: Path, log_path: Path, on_line: Callable[[str], None],
                      python: str = sys.executable) -> int:
    """Run `vlflow.execute` on `payload_path` in its own process; its output goes to `log_path` and `on_line`.

    Returns its exit code (negative: killed by that signal). Interrupted (Ctrl-C, SIGTERM, an error here), it kills
    the stage's whole process group before re-raising."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if stage_process_mode(python) == "spawn":
        with subprocess.Popen([python, "-m", "vlflow.execute", str(payload_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, start_new_session=True,
                              preexec_fn=die_with_parent) as proc:
            try:
                _copy_lines(proc.stdout, log_path, on_line)
                return proc.wait()
            except BaseException:
                _kill_group(proc.pid)
                raise
    read_fd, write_fd = os.pipe()
    process = _forkserver().Process(target=_stage_main,
                                    name=f"{STAGE_PROCESS_NAME}:{Path(payload_path).parent.name}",
                                    args=(str(payload_path), _InheritedFd(write_fd), env, os.getcwd()))
    try:
        with open(read_fd, "rb") as output:
            try:
                process.start()
            finally:
                os.close(write_fd)  # the child holds the only write end: EOF when it (and all it started) exits
            try:
                _copy_lines(output, log_path, on_line)
                process.join()
            except BaseException:
                if process.pid is not None:
                    _kill_group(process.pid)
                    process.kill()
                raise
        return process.exitcode
    finally:
        if process.exitcode is not None:
            process.close()


def _copy_lines(output, log_path: Path, on_line: Callable[[str], None]) -> None:
    with open(log_path, "w") as log:
        for raw in output:
            line = raw.decode(errors="replace")
            log.write(line)
            log.flush()
            on_line(line.rstrip("\n"))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # gone already, or not yet its own group leader (then the caller kills the process itself)
