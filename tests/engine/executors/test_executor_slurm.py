"""The Slurm executor against a real one-host Slurm cluster (the `slurm_cluster` fixture): stages run as batch jobs,
`vlflow run` on the "login node" waits, streams their output and commits; failures name the job id."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from vlflow.errors import VlflowError
from vlflow.executors.slurm import SlurmExecutor, parse_job
from vlflow.executors.spec import ExecutorSpec

SHARED_TOML = '[cache]\nurl = "cache"\n[state]\ndir = "state"\n[executor]\nshared_dirs = ["."]\n'


def project(tmp_path: Path, workflow: str, toml: str = SHARED_TOML) -> Path:
    (tmp_path / "vlflow.toml").write_text(toml)
    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent(workflow))
    return path


def vlflow(path: Path, *args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlflow", "run", str(path), *args], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_ids(text: str) -> list[str]:
    return re.findall(r"submitted Slurm job (\d+)", text)


def job_state(job_id: str, env: dict) -> str:
    shown = subprocess.run(["timeout", "10", "scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                           text=True)
    return parse_job(shown.stdout).state


@pytest.fixture
def cluster_env(slurm_cluster):
    return dict(os.environ, **slurm_cluster, OMP_NUM_THREADS="1")


TWO_STAGES = """\
    name: onslurm
    defaults:
      executor: {type: slurm, time: "5:00"}
    stages:
      a:
        uses: testing.write
        with: {text: from-a-job, files: 2}
      b:
        uses: testing.write
        with: {text: from-b-job}
      both:
        uses: testing.concat
        inputs: {a: a, b: b}
        executor: {type: local}
    """


def test_stages_run_as_jobs_commit_once_and_cached_stages_submit_nothing(tmp_path, cluster_env):
    path = project(tmp_path, TWO_STAGES)
    done = vlflow(path, "-j", "2", env=cluster_env)
    assert done.returncode == 0, done.stderr + done.stdout
    ids = job_ids(done.stdout)
    assert len(ids) == 2 and all(job_state(i, cluster_env) == "COMPLETED" for i in ids)
    # the local stage read both job-made artifacts
    shown = subprocess.run([sys.executable, "-m", "vlflow", "show", str(path), "both"], cwd=tmp_path,
                           env=cluster_env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    out = next((tmp_path / "cache").rglob("out.txt")).read_text()
    assert "from-a-job" in out and "from-b-job" in out
    log = next((tmp_path / "state" / "logs" / "onslurm").glob("a-*.log")).read_text()
    assert re.search(r"# sbatch .*--time=5:00", log) and re.search(rf"# Slurm job ({ids[0]}|{ids[1]})\n", log)
    again = vlflow(path, env=cluster_env)
    assert again.returncode == 0 and job_ids(again.stdout) == [] and "3 cached" in again.stdout


def test_a_failing_job_reports_the_stage_error_and_the_job_id(tmp_path, cluster_env):
    path = project(tmp_path, """\
        name: failing
        stages:
          broken:
            uses: testing.write
            with: {fail: true}
            executor: {type: slurm}
        """)
    done = vlflow(path, env=cluster_env)
    assert done.returncode == 2
    (job_id,) = job_ids(done.stdout)
    assert f"Slurm job {job_id} failed with exit code 2: " in done.stderr
    assert "failing on purpose (fail: true)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "cache").rglob("*.txt"))  # nothing committed


def test_status_shows_the_running_job_and_ctrl_c_cancels_it(tmp_path, cluster_env):
    path = project(tmp_path, """\
        name: slow
        stages:
          slow:
            uses: testing.write
            with: {sleep: 60}
            executor: {type: slurm}
        """)
    run = subprocess.Popen([sys.executable, "-m", "vlflow", "run", str(path)], cwd=tmp_path, env=cluster_env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_foreground)
    try:
        check_status_then_interrupt(run, path, cluster_env)
    finally:
        if run.poll() is None:
            run.kill()  # its job: scancel'ed by the test below or left to its 60 s


def as_foreground() -> None:
    """Ctrl-C reaches the run as it reaches a terminal's foreground process. A shell without job control starts
    background commands (`.ci/run &`, a CI runner's script) with SIGINT ignored, and that is inherited: a test
    sending SIGINT would otherwise depend on how pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def check_status_then_interrupt(run: subprocess.Popen, path: Path, cluster_env: dict) -> None:
    tmp_path = path.parent
    seen = ""
    for line in run.stdout:
        seen += line
        if job_ids(seen):
            break
    (job_id,) = job_ids(seen)
    deadline = time.monotonic() + 30
    while job_state(job_id, cluster_env) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    status = subprocess.run([sys.executable, "-m", "vlflow", "status", str(path)], cwd=tmp_path,
                            env=dict(cluster_env, COLUMNS="200"),
                            capture_output=True, text=True, timeout=60)
    assert re.search(rf"on Slurm: job {job_id} RUNNING n[12]", status.stdout), status.stdout + status.stderr
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 130
    assert f"cancelled Slurm job(s) {job_id}" in err
    deadline = time.monotonic() + 20
    while job_state(job_id, cluster_env) != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_state(job_id, cluster_env) == "CANCELLED"


def test_unreachable_controller_is_a_bounded_error(tmp_path, cluster_env):
    conf = Path(cluster_env["SLURM_CONF"]).read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=9", conf))
    path = project(tmp_path, """\
        name: nocontroller
        stages:
          a:
            uses: testing.write
            executor: {type: slurm, controller_timeout_s: 3}
        """)
    started = time.monotonic()
    done = vlflow(path, env=dict(cluster_env, SLURM_CONF=str(dead)), timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert re.search(r"stage a: (sbatch got no answer from the Slurm controller within 3s|sbatch refused the job: "
                     r".*(Unable to contact|connect))", done.stderr), done.stderr


def test_missing_sbatch_is_one_clear_error(tmp_path):
    path = project(tmp_path, "name: x\nstages:\n  a:\n    uses: testing.write\n    executor: {type: slurm}\n")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    done = vlflow(path, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {path}:3: stages.a.executor: stage a runs on Slurm (executor.type: slurm) "
                                  "but `sbatch` is not on PATH"), done.stderr


@pytest.mark.parametrize("toml, what", [
    ('[cache]\nurl = "cache"\n[state]\ndir = "state"\n', "the state dir"),
    ('[cache]\nurl = "/tmp/vlflow-elsewhere-cache"\n[state]\ndir = "state"\n[executor]\nshared_dirs = ["."]\n',
     "the cache /tmp/vlflow-elsewhere-cache is a local path that is not declared shared"),
])
def test_a_cache_or_state_dir_not_declared_shared_is_refused_before_anything_runs(tmp_path, toml, what):
    path = project(tmp_path, "name: x\nstages:\n  a:\n    uses: testing.write\n    executor: {type: slurm}\n", toml)
    done = vlflow(path, env=dict(os.environ))
    assert done.returncode == 2, done.stdout
    assert "error: " in done.stderr and what in done.stderr and "executor.shared_dirs" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "state" / "staging").exists()


def test_an_object_store_cache_needs_only_the_state_dir_shared(tmp_path):
    from vlflow.executors.slurm import check_can_submit
    from vlflow.workflow import load_workflow

    path = project(tmp_path, "name: x\nstages:\n  a:\n    uses: testing.write\n"
                   f"    executor: {{type: slurm, shared_dirs: [{tmp_path}]}}\n")
    decl = load_workflow(path).stages["a"]
    check_can_submit([decl], "s3://bucket/cache", False, tmp_path / "state")  # no error


def test_job_script_forwards_the_warning_signal_to_the_stage(tmp_path):
    """The batch shell passes Slurm's USR1 on and exits with the stage's code (run here without Slurm)."""
    stage = tmp_path / "stage.py"
    stage.write_text("import signal, sys, time\n"
                     "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
                     "print('ready', flush=True)\ntime.sleep(30)\n")
    script = SlurmExecutor(ExecutorSpec(type="slurm"), python=sys.executable).job_script(tmp_path / "payload.json")
    script = script.replace(f"{sys.executable} -m vlflow.executors.job {tmp_path / 'payload.json'}",
                            f"{sys.executable} {stage}")
    (tmp_path / "job.sh").write_text(script)
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "ready"
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=10) == 75


PREEMPTED_TRAINING = """\
    name: preempt
    stages:
      train:
        uses: testing.train
        with: {steps: 24, checkpoint_every: 4, sleep: 0.4}
        launch: {backend: gloo}
        executor: {type: slurm}
    """


def wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert condition(), "timed out"


def test_preemption_and_scancel_resume_to_the_weights_of_an_uninterrupted_run(tmp_path, cluster_env):
    """Slurm's --signal warning (simulated with `scancel --batch --signal=USR1`): the stage checkpoints at the step
    it is on and exits 75, vlflow resubmits (visible in the log). Then `scancel` of the resubmitted job: vlflow fails
    naming the job; the next `vlflow run` resumes from the checkpoint. The weights equal an uninterrupted local run."""
    from safetensors.torch import load_file

    (tmp_path / "slurm").mkdir()
    path = project(tmp_path / "slurm", PREEMPTED_TRAINING)
    run = subprocess.Popen([sys.executable, "-m", "vlflow", "run", str(path)], cwd=path.parent, env=cluster_env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work, logs = path.parent / "state" / "work", path.parent / "state" / "logs" / "preempt"
    wait_for(lambda: list(work.rglob("step_4")), 150, run)
    log_path = next(logs.glob("train-*.log"))
    jobs = lambda: re.findall(r"# Slurm job (\d+)\n", log_path.read_text())  # noqa: E731
    (first_job,) = jobs()
    subprocess.run(["timeout", "10", "scancel", "--batch", "--signal=USR1", first_job], env=cluster_env, check=True)
    wait_for(lambda: len(jobs()) == 2, 60, run)
    log = log_path.read_text()
    assert f"Slurm job {first_job} ended (checkpointed on Slurm's warning signal); resubmitting (1/3)" in log
    stopped_at = int(re.search(r"stopping at step (\d+) on Slurm's warning signal", log).group(1))
    second_job = jobs()[1]
    wait_for(lambda: list(work.rglob("step_8")), 150, run)  # the resubmitted job checkpointed again
    subprocess.run(["timeout", "10", "scancel", second_job], env=cluster_env, check=True)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2 and f"Slurm job {second_job} was cancelled" in err, err
    assert f"/step_{stopped_at} (step {stopped_at})" in log_path.read_text()  # the resubmission resumed

    again = vlflow(path, env=cluster_env, timeout=240)
    assert again.returncode == 0, again.stderr + again.stdout
    manifest = json.loads(next((path.parent / "cache").rglob("manifest.json")).read_text())
    assert 8 <= manifest["meta"]["metrics"]["resumed_from_step"] < 24

    (tmp_path / "local").mkdir()
    local = project(tmp_path / "local", PREEMPTED_TRAINING.replace("executor: {type: slurm}", "executor: {}")
                    .replace("sleep: 0.4", "sleep: 0"))
    done = vlflow(local, env=cluster_env, timeout=240)
    assert done.returncode == 0, done.stderr
    weights = [load_file(next((p.parent / "cache").rglob("model.safetensors"))) for p in (path, local)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("launcher, started", [
    (None, r"--kill-on-bad-exit=1 \S+ -m vlflow.launch.worker --launcher slurm"),  # srun, one task per rank
    ("torchrun", r"--kill-on-bad-exit=1 bash -c .* -m torch.distributed.run --node_rank .*--nnodes 2 "),  # per node
], ids=["srun", "torchrun"])
def test_a_distributed_stage_runs_as_a_two_node_job_with_one_rank_per_node(tmp_path, cluster_env, launcher, started):
    launch = f"{{backend: gloo, launcher: {launcher}}}" if launcher else "{backend: gloo}"
    path = project(tmp_path, f"""\
        name: twonodes
        stages:
          train:
            uses: testing.train
            with: {{steps: 4, checkpoint_every: 2}}
            launch: {launch}
            executor: {{type: slurm, nodes: 2}}
        """)
    done = vlflow(path, env=cluster_env, timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout
    log = next((tmp_path / "state" / "logs" / "twonodes").glob("train-*.log")).read_text()
    assert re.search(r"# sbatch .*--nodes=2 ", log)
    assert re.search(r"# srun --nodes 2 --ntasks-per-node 1 --ntasks 2 " + started, log), log[-3000:]
    assert "world size: 2" in log
    manifest = json.loads(next((tmp_path / "cache").rglob("manifest.json")).read_text())
    assert manifest["meta"]["metrics"]["world_size"] == 2


def test_a_controller_that_stops_answering_while_a_job_runs_is_a_bounded_error(tmp_path, cluster_env):
    conf = Path(cluster_env["SLURM_CONF"]).read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=9", conf))
    executor = SlurmExecutor(ExecutorSpec(type="slurm", controller_timeout_s=2), env=cluster_env)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 30\n")
    with open(tmp_path / "log", "w") as log:
        job_id = executor.submit("vlflow-test-sleep", script, tmp_path / "out", log)
        try:
            executor.env["SLURM_CONF"] = str(dead)  # from now on the controller does not answer
            started = time.monotonic()
            with pytest.raises(VlflowError, match=rf"did not answer for 2s while waiting for job {job_id}"):
                executor.wait(job_id, tmp_path / "out", log, lambda line: None)
            assert time.monotonic() - started < 20
        finally:
            executor.env["SLURM_CONF"] = cluster_env["SLURM_CONF"]
            executor.cancel(job_id)


def _pretrain_manifest(cache: Path) -> dict:
    (manifest,) = [m for m in (json.loads(p.read_text()) for p in (cache / "artifacts").glob("*/manifest.json"))
                   if m["meta"]["stage"] == "pretrain"]
    return manifest


@pytest.mark.slow
def test_tiny_vilt_pretrain_as_a_two_node_slurm_job_makes_the_local_bytes_and_retrieves_above_chance(
        tmp_path, cluster_env):
    """tiny_vilt's pretrain as a 2-node x 1-rank Slurm job (srun, one rank per fake node) makes exactly the bytes of the
    local 2-rank pretrain (the same cache key, forced to rerun on Slurm, commits the same data digest); then the
    fine-tune and evaluation run locally on it and the retrieval thresholds of tests/e2e/test_vilt_e2e.py hold."""
    root = REPO_ROOT
    toml = SHARED_TOML + f'[workflow]\ninclude_paths = ["{root / "workflows"}"]\n'
    project(tmp_path, f"extends: {root / 'workflows' / 'tiny_vilt.yaml'}\nname: tiny_vilt_local\n", toml=toml)
    local = vlflow(tmp_path / "wf.yaml", "--until", "pretrain", env=cluster_env, timeout=600)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert not job_ids(local.stdout)
    before = _pretrain_manifest(tmp_path / "cache")

    project(tmp_path, f"""\
        extends: {root / 'workflows' / 'tiny_vilt.yaml'}
        name: tiny_vilt_slurm
        stages:
          pretrain:
            launch: {{nproc_per_node: 1}}
            executor: {{type: slurm, nodes: 2, time: "30:00"}}
        """, toml=toml)
    done = vlflow(tmp_path / "wf.yaml", "--until", "pretrain", "--force", "pretrain", env=cluster_env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(job_ids(done.stdout)) == 1  # only pretrain went to Slurm; data, arrows, tokenizer were cached
    log = next((tmp_path / "state" / "logs" / "tiny_vilt_slurm").glob("pretrain-*.log")).read_text()
    assert re.search(r"# srun --nodes 2 --ntasks-per-node 1 --ntasks 2 ", log) and "world size: 2" in log
    after = _pretrain_manifest(tmp_path / "cache")
    assert after["key"] == before["key"] and after["attempt"] != before["attempt"]  # it really ran again
    assert after["data_digest"] == before["data_digest"]  # the trained weights, byte for byte

    evaluated = vlflow(tmp_path / "wf.yaml", "--until", "evaluate", env=cluster_env, timeout=900)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert not job_ids(evaluated.stdout)  # the Slurm artifact is used as it is
    found = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("metrics.json")
             if p.parent.name != "_vlflow"]
    (metrics,) = [m for m in found if isinstance(m.get("all"), dict) and "chance_r1" in m["all"]]
    test = metrics["all"]
    assert test["ir_r1"] >= 5 * test["chance_r1"] and test["tr_r1"] >= 5 * test["chance_r1"], test
