"""Starts a non-distributed stage's process on this machine: forked from a warm server (default) or a fresh interpreter.

A fresh `python -m vlflow.execute` costs ~100 ms of interpreter start and imports per stage. By default the stage
process is instead forked from a stage server: one clean interpreter, started once per runner process with the vlflow
modules a stage process needs and every stage spec module already imported (never torch, never a stage's entry
module), that forks a child per stage in a few ms. The server holds no runner state (it is a fresh interpreter, not a
fork of the runner), so a stage starts as clean as before. It is ours rather than multiprocessing's forkserver, which
pickles preparation data, re-runs its bootstrap and pings its resource tracker for every child: that was about a third
of a trivial stage's CPU time. The child keeps every guarantee of the fresh interpreter:
- its stdout and stderr go to a pipe the runner copies into the stage log, line by line, as before;
- it leads its own process group (`os.setsid`), so the runner's kill reaches everything the stage started;
- it dies with its parent (PR_SET_PDEATHSIG); the server exits as soon as the runner is gone (its socket closes), so
  a killed runner leaves no stage behind;
- its exit code means what the interpreter's meant: 0 done, 2 a user-facing error, 1 a traceback, -N killed by signal
  N; like an interpreter at exit it waits for the stage's non-daemon threads and runs its atexit callbacks;
- its command line (setproctitle) and `sys.argv` read `python -m vlflow.execute PAYLOAD`, as before;
- it gets the runner's environment and working directory as they are when the stage starts.
Stages whose spec imports torch pay that import in the child, as before; the runner process never imports it.

`VLFLOW_STAGE_PROCESS=spawn` falls back to a fresh interpreter per stage (`python -m vlflow.execute`); it is also used
when the runner was asked for another interpreter than its own and on platforms without fork or unix sockets.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from vlflow.errors import VlflowError
from vlflow.procs import die_with_parent

STAGE_PROCESS_ENV = "VLFLOW_STAGE_PROCESS"
MODES = ("forkserver", "spawn")
# Imported once by the server so that each forked stage has them already. Light modules only: never torch.
STAGE_PRELOAD = ["vlflow.execute", "vlflow.payload", "vlflow.stage", "vlflow.errors", "vlflow.procs",
                 "vlflow.executors.forked", "pydantic", "logging", "json", "traceback", "setproctitle"]

_start_lock = threading.Lock()
_server: "_StageServer | None" = None
_retired_servers: list["_StageServer"] = []  # replaced after sys.path changed; kept so their stages run to the end


def stage_process_mode(python: str = sys.executable) -> str:
    """How this run starts stage processes: "forkserver" or "spawn" (see the module docstring)."""
    mode = os.environ.get(STAGE_PROCESS_ENV, "").strip() or "forkserver"
    if mode not in MODES:
        raise VlflowError(f"{STAGE_PROCESS_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "forkserver" and (python != sys.executable or not hasattr(os, "fork")
                                 or not hasattr(socket, "send_fds")):
        return "spawn"
    return mode


def _spec_modules() -> list[str]:
    """The modules declaring stage types: light by contract (no torch; the runner itself imports every one of them
    to plan), and importing its spec is a good part of a trivial stage's time. Entry modules are never preloaded."""
    from vlflow.stage import registry, spec_source

    return sorted({source.partition(":")[0] for source in map(spec_source, registry()) if source})


class _StageServer:
    """The runner's handle on its stage server: one request per stage, over a socket pair of its own that carries the
    request, then the stage's pid, then its exit code (from the stage process as it exits, else from the server)."""

    def __init__(self, preload: list[str], import_path: list[str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The server imports from the runner's sys.path as it is now (a stage package added to sys.path at run time
        # must be found, as multiprocessing's forkserver passed its children the parent's sys.path).
        self.key = (tuple(import_path), tuple(preload))
        with theirs:  # stdin: none (as multiprocessing's children had); Ctrl-C: ignored, the runner kills stages
            self.process = subprocess.Popen(
                [sys.executable, "-c", "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from vlflow."
                                       "executors.forked import serve; serve(int(sys.argv[2]), sys.argv[3:])",
                 json.dumps(import_path), str(theirs.fileno()), *preload],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self.control = ours  # never inherited (PEP 446): when this process dies, the server sees EOF and exits
        self._send = threading.Lock()

    def alive(self) -> bool:
        return self.process.poll() is None

    def start(self, payload_path: Path, output_fd: int, environ: dict[str, str]) -> tuple[int, "_Replies"]:
        """Fork a stage process writing to `output_fd`; returns its pid and where its exit code will come."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        replies = _Replies(ours)
        try:
            with theirs:
                with self._send:
                    socket.send_fds(self.control, [b"stage"], [output_fd, theirs.fileno()])
            request = {"payload": str(payload_path), "environ": environ, "cwd": os.getcwd()}
            ours.sendall(json.dumps(request).encode() + b"\n")
            return replies.wait_for("pid", "its pid"), replies
        except BaseException:
            replies.close()
            raise


class _Replies:
    """What the server and the stage process say about one stage, one `KIND VALUE` line each: `pid N` (the server,
    after the fork) and `exit N` (the stage process as it exits, and the server once it has reaped it: the first
    counts). Both write on one socket, so the exit code can come before the pid."""

    def __init__(self, sock: socket.socket):
        self.socket = sock
        self.buffer = b""
        self.values: dict[str, int] = {}

    def receive(self) -> bool:
        """Read what has come (blocking until something has); False when nobody can send any more."""
        chunk = self.socket.recv(256)
        if not chunk:
            return False
        *lines, self.buffer = (self.buffer + chunk).split(b"\n")
        for line in lines:
            kind, _, value = line.decode().partition(" ")
            self.values.setdefault(kind, int(value))
        return True

    def wait_for(self, kind: str, what: str) -> int:
        while kind not in self.values:
            if not self.receive():
                raise VlflowError(f"the stage server died before it sent {what} (the stage was killed with it)")
        return self.values[kind]

    def close(self) -> None:
        self.socket.close()


def _stage_server() -> _StageServer:
    """The runner's stage server: started once per runner process; again if it was killed, or if sys.path or the
    registered stage packages changed since (an older server is left to serve the stages it started: it exits with
    the runner)."""
    global _server
    with _start_lock:
        preload, import_path = STAGE_PRELOAD + _spec_modules(), list(sys.path)
        if _server is None or not _server.alive() or _server.key != (tuple(import_path), tuple(preload)):
            if _server is not None:
                _retired_servers.append(_server)
            _server = _StageServer(preload, import_path)
        return _server


def serve(control_fd: int, preload: list[str]) -> None:
    """The stage server's main loop (`python -c`, started by `_StageServer`): fork a stage per request, send its pid,
    and its exit code once it has ended; return when the runner's end of the control socket closes."""
    import importlib
    import selectors

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the runner, which kills the stages
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # a stage of that type meets the error itself, in its own log
    try:  # once here, rather than at each stage process's first validation of its params
        from vlflow.stage import build_params_models, registry

        build_params_models(registry().values())
    except Exception:
        pass  # the runner has loaded the same registry: a stage process meets any error there in its own log
    control = socket.socket(fileno=control_fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below through the wakeup fd
    exit_codes: dict[int, socket.socket] = {}  # stage pid -> where its exit code goes
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is control:
                    try:
                        message, fds, _, _ = socket.recv_fds(control, 16, 2)
                    except OSError:
                        message, fds = b"", []
                    if not message:  # the runner is gone: so are its stages and all they started
                        for pid in exit_codes:
                            _kill_group(pid)
                        return
                    output_fd, reply_fd = fds
                    reply = socket.socket(fileno=reply_fd)
                    held = [control, wake_read, wake_write, selector, *exit_codes.values()]  # the child closes them
                    pid = _fork_stage(reply, output_fd, held)
                    os.close(output_fd)
                    if pid is None:
                        reply.close()
                        continue
                    exit_codes[pid] = reply
                    try:
                        _send_line(reply, "pid", pid)
                    except OSError:
                        pass  # the runner stopped waiting (its exit code goes nowhere either)
                else:
                    while True:
                        try:
                            if not os.read(wake_read, 4096):
                                break
                        except BlockingIOError:
                            break
                    _report_ended(exit_codes)


def _fork_stage(reply: socket.socket, output_fd: int, server_fds: list) -> int | None:
    """Read one request from `reply` and fork its stage process; None when the runner left before sending it."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = reply.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    request = json.loads(data)
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the stage process: nothing of the server's but its imports
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for held in server_fds:  # sockets, the selector, pipe fds
            held.close() if hasattr(held, "close") else os.close(held)
        code = _stage_main(request["payload"], output_fd, request["environ"], request["cwd"])
    except SystemExit as exc:  # what an interpreter exits with for sys.exit(x)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            # Said by the stage process itself, the runner need not wait for the server to reap it; the server's
            # word (sent too) counts only when this never came: the process was killed or crashed.
            _send_line(reply, "exit", code % 256)
        except BaseException:
            pass
        finally:
            os._exit(code)


def _report_ended(exit_codes: dict[int, socket.socket]) -> None:
    while exit_codes:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply = exit_codes.pop(pid, None)
        if reply is not None:
            try:
                _send_line(reply, "exit", os.waitstatus_to_exitcode(status))
            except OSError:
                pass  # the runner stopped waiting for it
            reply.close()


def _send_line(sock: socket.socket, kind: str, value: int) -> None:
    sock.sendall(f"{kind} {value}\n".encode())


def _stage_main(payload_path: str, output_fd: int, environ: dict[str, str], cwd: str) -> int:
    """The forked child: become what `python -m vlflow.execute payload` was, run it and end as its interpreter would."""
    os.setsid()  # own process group: the runner's killpg reaches whatever the stage starts
    try:  # the command line a fresh interpreter had: ps, and checks that no stage outlived its run, find it
        from setproctitle import setproctitle

        setproctitle(f"{sys.executable} -m vlflow.execute {payload_path}")
    except ImportError:
        pass
    die_with_parent()
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # lines reach the log as they are printed, like PYTHONUNBUFFERED
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    import vlflow.execute

    sys.argv = [vlflow.execute.__file__, payload_path]
    try:
        return vlflow.execute.main([payload_path])
    finally:  # what an interpreter does at exit: wait for non-daemon threads, then run atexit callbacks
        import atexit

        threading._shutdown()  # type: ignore[attr-defined]  # the hook Py_Finalize calls
        atexit._run_exitfuncs()


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
    try:
        pid, replies = _stage_server().start(payload_path, write_fd, env)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds the only write end: EOF when it (and all it started) exits
    try:
        return _copy_output_until_exit(read_fd, replies, pid, log_path, on_line)
    except BaseException:
        _kill_group(pid)
        raise
    finally:
        os.close(read_fd)
        replies.close()


def _copy_output_until_exit(output_fd: int, replies: _Replies, pid: int, log_path: Path,
                            on_line: Callable[[str], None]) -> int:
    """Copy a forked stage's output into its log until every writer has closed it; return the stage's exit code.

    Should the server die first, the stage died with it: its process group is killed, so that whatever it started
    lets go of the output too, and the error says what happened."""
    import selectors

    code: int | None = None
    server_died: VlflowError | None = None
    pending = b""
    with open(log_path, "w") as log, selectors.DefaultSelector() as selector:

        def emit(raw: bytes, end: str) -> None:
            line = raw.decode(errors="replace")
            log.write(line + end)
            on_line(line)

        selector.register(output_fd, selectors.EVENT_READ)
        code = replies.values.get("exit")  # it may have come with the pid: then the stage has ended already
        if code is None:
            selector.register(replies.socket, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                if key.fileobj is replies.socket:
                    if not replies.receive():
                        server_died = VlflowError("the stage server died before it sent the stage's exit code "
                                                  "(the stage was killed with it)")
                        _kill_group(pid)
                    code = replies.values.get("exit")
                    if code is not None or server_died is not None:
                        selector.unregister(replies.socket)
                    continue
                chunk = os.read(output_fd, 1 << 16)
                if chunk:
                    *lines, pending = (pending + chunk).split(b"\n")
                    for raw in lines:
                        emit(raw, "\n")
                else:  # every writer has closed it
                    if pending:
                        emit(pending, "")
                    selector.unregister(output_fd)
                log.flush()
    if server_died is not None:
        raise server_died
    assert code is not None
    return code


def _copy_lines(output, log_path: Path, on_line: Callable[[str], None]) -> None:
    with open(log_path, "w") as log:
        for raw in output:
            line = raw.decode(errors="replace")
            log.write(line)
            log.flush()
            on_line(line.rstrip("\n"))


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # the group; the process itself, should it not lead its group yet
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # gone already
