"""End-to-end through the `vlflow` executable: a killed training run resumes; concurrent runs serialise on the lock;
an S3 cache (moto on 127.0.0.1) works like a local one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import write_project_config
from vlflow.procs import processes_mentioning

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

TRAIN = """
name: resume
stages:
  data: {uses: testing.write, with: {files: 2}}
  train:
    uses: testing.train
    inputs: {data: data}
    with: {steps: 40, checkpoint_every: 5, sleep: 0.15}
    launch: {nproc_per_node: 2}
"""


def _project(tmp_path: Path, workflow: str) -> Path:
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(workflow)
    return tmp_path


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoints(project: Path) -> list[Path]:
    return list((project / "state" / "work").glob("*/checkpoints/step_*"))


@pytest.mark.dist
def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    project = _project(tmp_path, TRAIN)
    proc = subprocess.Popen([VLFLOW, "run", "wf.yaml"], cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(_checkpoints(project)) >= 2, 120, "two checkpoints")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: vlflow, torchrun and its workers
        proc.wait(timeout=30)
    # nothing of the training stage was committed
    committed = [json.loads(p.read_text())["meta"]["stage"] for p in (project / "cache").rglob("manifest.json")]
    assert committed == ["data"]
    # the killed execution left its staging dir, torchrun's log dir inside it (not a /tmp/torchelastic_* dir)
    left = list((project / "state" / "staging").iterdir())
    assert len(left) == 1 and (left[0] / "torchelastic").is_dir(), left
    done = subprocess.run([VLFLOW, "run", "wf.yaml"], cwd=project, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cached" in done.stdout and "data" in done.stdout
    logs = [p.read_text() for p in (project / "cache").rglob("stage.log")]
    train_log = next(text for text in logs if "resum" in text.lower())
    assert "step" in train_log
    # work dir is dropped once the artifact is committed, and the killed run's staging dir was swept
    assert not _checkpoints(project)
    assert "removed 1 staging dir(s) left by killed runs" in done.stdout
    assert not list((project / "state" / "staging").iterdir())


def test_concurrent_runs_serialise_on_the_lock(tmp_path):
    project = _project(tmp_path, textwrap.dedent("""
        name: locked
        stages:
          slow: {uses: testing.write, with: {files: 20, size: 8, sleep: 4}}
    """))
    first = subprocess.Popen([VLFLOW, "run", "wf.yaml"], cwd=project, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: any((project / "cache" / "locks" / "runs").glob("*.lock")), 30,
              "the first run's lock (a local cache holds its lock files)")
    second = subprocess.run([VLFLOW, "run", "wf.yaml"], cwd=project, env=_env(), capture_output=True, text=True,
                            timeout=120)
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, out1 + second.stdout + second.stderr
    assert "waiting" in second.stdout.lower()
    assert "1 ran" in out1 and "0 ran, 1 cached" in second.stdout
    assert len(list((project / "cache").rglob("manifest.json"))) == 1


SECRET = "vlflow-test-secret-value"


def test_s3_cache_on_moto(tmp_path, s3_cache_url, moto_server):
    project = _project(tmp_path, textwrap.dedent("""
        name: s3
        stages:
          a: {uses: testing.write, with: {files: 3}}
          b: {uses: testing.concat, inputs: {a: a}}
    """))
    env = dict(_env(), VLFLOW_S3_ENDPOINT_URL=moto_server, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    first = subprocess.run([VLFLOW, "run", "wf.yaml", "--cache", s3_cache_url], cwd=project, env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 ran" in first.stdout
    again = subprocess.run([VLFLOW, "run", "wf.yaml", "--cache", s3_cache_url], cwd=project, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 ran, 2 cached" in again.stdout
    shown = subprocess.run([VLFLOW, "ls", "wf.yaml", "b", "--cache", s3_cache_url], cwd=project, env=env,
                           capture_output=True, text=True, timeout=60)
    assert "out.txt" in shown.stdout
    logs = "".join(p.read_text() for p in (project / "state").rglob("*.log"))
    assert SECRET not in first.stdout + first.stderr + again.stdout + shown.stdout + logs


@pytest.mark.dist
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_stopping_only_the_vlflow_process_stops_every_stage_process(tmp_path, signum):
    """kill -9 / kill (not of the group) of `vlflow run`: torchrun and both ranks go with it, nothing is committed
    for the stage, and the cache lock is free for the next run."""
    project = _project(tmp_path, TRAIN)
    proc = subprocess.Popen([VLFLOW, "run", "wf.yaml"], cwd=project, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    staging = str(project / "state" / "staging")
    try:
        _wait_for(lambda: len(_checkpoints(project)) >= 1, 120, "a checkpoint")
        assert len(processes_mentioning(staging)) >= 3  # torchrun agent + 2 ranks
        proc.send_signal(signum)
        proc.wait(timeout=30)
        _wait_for(lambda: not processes_mentioning(staging), 20, "stage processes to exit")
    finally:
        for pid in processes_mentioning(staging):
            os.kill(pid, signal.SIGKILL)
    if signum == signal.SIGTERM:
        assert proc.returncode == 130 and "nothing partial was committed" in proc.stderr.read()
    stages = [json.loads(p.read_text())["meta"]["stage"] for p in (project / "cache").rglob("manifest.json")]
    assert stages == ["data"]


@pytest.mark.dist
def test_killing_the_run_while_ranks_start_up_leaves_no_rank_behind(tmp_path):
    """The ranks' imports take seconds; a whole-tree kill -9 landing then (torchrun dies before a rank has tied itself
    to it) must still leave no rank running, orphaned, waiting for its peers."""
    project = _project(tmp_path, TRAIN)
    proc = subprocess.Popen([VLFLOW, "run", "wf.yaml"], cwd=project, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ranks = str(project / "state" / "staging")
    try:
        # as soon as both ranks exist (torchrun + 2 workers), long before they have imported torch
        _wait_for(lambda: len(processes_mentioning("vlflow.launch.worker " + ranks)) >= 2, 120, "ranks to start")
        os.killpg(proc.pid, signal.SIGKILL)  # vlflow and torchrun (the ranks run in sessions of their own)
        proc.wait(timeout=30)
        _wait_for(lambda: not processes_mentioning(ranks), 20, "starting ranks to exit")
    finally:
        for pid in processes_mentioning(ranks):
            os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_is_not_the_expected_launcher_kills_itself():
    code = ("from vlflow.procs import die_with_parent; import sys; "
            "die_with_parent(parent_command=(sys.argv[1],)); print('alive')")
    adopted = subprocess.run([sys.executable, "-c", code, "no-such-launcher"], capture_output=True, text=True,
                             timeout=60)
    assert adopted.returncode == -signal.SIGKILL and "alive" not in adopted.stdout
    with_launcher = subprocess.run([sys.executable, "-c", code, "python"], capture_output=True, text=True, timeout=60)
    assert with_launcher.returncode == 0 and "alive" in with_launcher.stdout  # pytest's python is the parent
