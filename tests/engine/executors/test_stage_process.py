"""Stage processes forked from the warm server (vlflow.executors.forked) keep the fresh interpreter's guarantees:
output in the stage log, the same exit codes, a crash or kill costs the stage alone, its children die with it, and the
runner and cache stay intact so that the next run redoes the stage."""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, write_project_config
from vlflow.errors import StageError, VlflowError
from vlflow.executors import forked
from vlflow.executors.forked import run_stage_process
from vlflow.stage import Params, StageSpec


class ProbeParams(Params):
    how: str = "ok"
    pid_file: str = ""


# Found by vlflow.stage.load_spec through the payload's spec_source: the stage process imports this module only
STAGES = [StageSpec(name="probe.stage", entry="tests.engine.executors.test_stage_process:probe", params=ProbeParams)]


def probe(ctx) -> dict:
    how = ctx.params.how
    print("line on stdout", flush=True)
    print("line on stderr", file=sys.stderr, flush=True)
    print(f"env={os.environ.get('VLFLOW_PROBE')} cwd={os.getcwd()} pgid_is_pid={os.getpgid(0) == os.getpid()}")
    print(f"argv={sys.argv[1:]}")
    atexit.register(print, "atexit callback ran", flush=True)  # as an interpreter does at exit
    if how == "sys_exit":
        sys.exit(5)
    if how == "raise":
        raise RuntimeError("probe exploded")
    if how == "user_error":
        raise StageError("probe rejects its input")
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "hang":  # a grandchild in the stage's process group, then wait to be killed
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path(ctx.params.pid_file).write_text(f"{os.getpid()} {child.pid}")
        time.sleep(120)
    (ctx.output_dir / "done.txt").write_text("ok")
    return {"answer": 42}


def write_payload(tmp_path: Path, how: str = "ok", pid_file: str = "") -> Path:
    staging = tmp_path / f"staging-{how}"
    staging.mkdir()
    payload = {"stage": "probe", "uses": "probe.stage", "params": {"how": how, "pid_file": pid_file}, "inputs": {},
               "output_dir": str(staging / "output"), "work_dir": None, "launch": None, "log_level": "INFO",
               "spec_source": "tests.engine.executors.test_stage_process"}
    path = staging / "payload.json"
    path.write_text(json.dumps(payload))
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(params=["forkserver", "spawn"])
def mode(request, monkeypatch) -> str:
    monkeypatch.setenv(forked.STAGE_PROCESS_ENV, request.param)
    # a fresh interpreter finds this module (the probe's spec) the way any interpreter would: on its path
    repo = str(REPO_ROOT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    return request.param


def test_output_lands_in_the_log_with_the_callers_environment_and_cwd(tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLFLOW_PROBE", "set-after-the-server-started")  # the server may be older than this value
    payload, log, lines = write_payload(tmp_path), tmp_path / "stage.log", []
    assert run_stage_process(payload, log, lines.append) == 0
    text = log.read_text()
    assert "line on stdout" in text and "line on stderr" in text
    assert f"env=set-after-the-server-started cwd={tmp_path} pgid_is_pid=True" in text
    assert f"argv={[str(payload)]}" in text and text.splitlines()[-1] == "atexit callback ran"
    assert lines == text.splitlines()
    assert json.loads((payload.parent / "payload.json.result.json").read_text()) == {"answer": 42}


@pytest.mark.parametrize("how, code, says", [("raise", 1, "RuntimeError: probe exploded"),
                                             ("user_error", 2, "error: probe rejects its input"),
                                             ("exit", 3, "line on stdout"),
                                             ("sys_exit", 5, "atexit callback ran"),
                                             ("segfault", -signal.SIGSEGV, "line on stdout")])
def test_a_crashing_stage_reports_the_interpreters_exit_code_and_the_server_survives(tmp_path, mode, how, code,
                                                                                       says):
    log = tmp_path / "stage.log"
    assert run_stage_process(write_payload(tmp_path, how), log, lambda line: None) == code
    assert says in log.read_text()
    assert not (tmp_path / f"staging-{how}" / "payload.json.result.json").exists()
    # the next stage starts normally
    assert run_stage_process(write_payload(tmp_path), tmp_path / "next.log", lambda line: None) == 0


def test_interrupting_the_runner_kills_the_stage_and_what_it_started(tmp_path, mode):
    pid_file, command_lines = tmp_path / "pids", []

    def interrupt_once_started(line: str) -> None:
        if line.startswith("env="):
            deadline = time.time() + 20
            while not pid_file.exists() and time.time() < deadline:
                time.sleep(0.05)
            stage = int(pid_file.read_text().split()[0])
            command_lines.append(Path(f"/proc/{stage}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage_process(write_payload(tmp_path, "hang", str(pid_file)), tmp_path / "stage.log",
                          interrupt_once_started)
    stage, grandchild = map(int, pid_file.read_text().split())
    deadline = time.time() + 10
    while (alive(stage) or alive(grandchild)) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(stage) and not alive(grandchild)
    # the stage's command line reads as a fresh interpreter's did: ps and leftover-process checks find it
    assert command_lines[0].endswith(f"-m vlflow.execute {tmp_path / 'staging-hang' / 'payload.json'}")


def test_a_killed_stage_server_takes_its_stages_along_and_the_next_stage_gets_a_new_one(tmp_path, monkeypatch):
    monkeypatch.setenv(forked.STAGE_PROCESS_ENV, "forkserver")  # only the default mode has a server
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    assert run_stage_process(write_payload(tmp_path), tmp_path / "first.log", lambda line: None) == 0
    server, pid_file = forked._server.process, tmp_path / "pids"

    def kill_server_once_started(line: str) -> None:
        if line.startswith("env="):
            while not pid_file.exists():
                time.sleep(0.05)
            server.kill()

    with pytest.raises(VlflowError, match="the stage server died before it sent the stage's exit code"):
        run_stage_process(write_payload(tmp_path, "hang", str(pid_file)), tmp_path / "stage.log",
                          kill_server_once_started)
    stage, grandchild = map(int, pid_file.read_text().split())
    deadline = time.time() + 10
    while (alive(stage) or alive(grandchild)) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(stage) and not alive(grandchild)  # with its parent, the server; and by the runner's kill
    (tmp_path / "next").mkdir()
    assert run_stage_process(write_payload(tmp_path / "next"), tmp_path / "next.log", lambda line: None) == 0
    assert forked._server.process.pid != server.pid


def test_an_exit_code_said_before_the_pid_is_kept_for_later():
    """A quick stage process says its exit code before the server has sent its pid (both write on one socket)."""
    import socket

    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(b"exit 0\npid 4242\nexit 0\n")
    replies = forked._Replies(ours)
    assert replies.wait_for("pid", "its pid") == 4242
    assert replies.values["exit"] == 0
    replies.close()


def test_stage_processes_skip_the_callers_main_script(tmp_path):
    """A script without a __name__ guard that runs a stage must not run again inside the stage process."""
    script = tmp_path / "unguarded.py"
    payload = write_payload(tmp_path)
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
                      "from pathlib import Path\nfrom vlflow.executors.forked import run_stage_process\n"
                      "print('script body ran', flush=True)\n"
                      f"sys.exit(run_stage_process(Path({str(payload)!r}), Path({str(tmp_path / 'log')!r}), print))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, VLFLOW_STAGE_PROCESS="forkserver"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("script body ran") == 1
    assert "line on stdout" in done.stdout


def test_the_mode_setting_is_checked_and_the_server_preloads_no_torch(monkeypatch):
    monkeypatch.setenv(forked.STAGE_PROCESS_ENV, "threads")
    with pytest.raises(Exception, match="VLFLOW_STAGE_PROCESS='threads': expected one of forkserver, spawn"):
        forked.stage_process_mode()
    monkeypatch.setenv(forked.STAGE_PROCESS_ENV, "forkserver")
    assert forked.stage_process_mode("/some/other/python") == "spawn"  # another interpreter: a fresh one
    code = f"import sys; [__import__(m) for m in {forked.STAGE_PRELOAD!r}]; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def runner_descendants(pid: int) -> list[int]:
    from vlflow.executors.job import descendants

    return descendants(pid)


def test_a_killed_stage_leaves_the_runner_and_cache_intact_and_the_next_run_redoes_it(tmp_path):
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text("name: chain\nstages:\n  a: {uses: testing.write, with: {files: 2}}\n"
                                      "  b: {uses: testing.write, with: {files: 1, sleep: 2}, needs: [a]}\n")
    vlflow = [sys.executable, "-m", "vlflow"]
    runner = subprocess.Popen(vlflow + ["run", "wf.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    stage = None
    deadline = time.time() + 60
    while stage is None and time.time() < deadline:  # b's process: a descendant leading its own process group
        if list((tmp_path / "state" / "logs" / "chain").glob("b-*.log")):
            leaders = [p for p in runner_descendants(runner.pid) if _pgid(p) == p]
            stage = leaders[0] if leaders else None
        time.sleep(0.05)
    assert stage is not None, "stage b never started"
    os.kill(stage, signal.SIGKILL)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode != 0
    assert "stage b (testing.write) failed with exit code -9" in out
    again = subprocess.run(vlflow + ["run", "wf.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 ran, 1 cached" in again.stdout + again.stderr


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_stage_server_follows_the_runners_sys_path(monkeypatch, tmp_path):
    """A stage package put on sys.path after the server started (a plugin dir, a test's toy package) must be
    importable by the next stage: the runner starts a server with its current sys.path; the old one keeps serving."""
    first = forked._stage_server()
    assert forked._stage_server() is first  # unchanged path: the same server
    monkeypatch.syspath_prepend(str(tmp_path))
    second = forked._stage_server()
    assert second is not first and second.alive() and first.alive()
    assert second.key[0][0] == str(tmp_path)
