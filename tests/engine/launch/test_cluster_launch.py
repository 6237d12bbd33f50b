"""Real mpirun, srun, and srun-started torchrun launches of a distributed stage (testing.train, 2 gloo ranks), through
`vlflow run`, against the one-host Slurm test cluster (scripts/cluster/, 2 fake nodes) and Open MPI. Each trains,
commits, and ends with weights identical to the single-node torchrun launch of the same stage. Also: the cluster
scripts themselves, and the launch settings the launcher adds (allow-run-as-root, oversubscribe, master address from
the allocation)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CLUSTER_SCRIPTS, missing_cluster_piece, write_project_config
from vlflow.errors import LaunchError
from vlflow.launch.command import JOIN_DIR_ENV, build_command, launcher_env, resolve_master_addr
from vlflow.stage import LaunchSpec

VLFLOW = str(Path(sys.executable).with_name("vlflow"))
RUN_TIMEOUT = 240

WORKFLOW = """
name: cluster
stages:
  data: {{uses: testing.write, with: {{files: 2}}}}
  train:
    uses: testing.train
    inputs: {{data: data}}
    with: {{steps: 6, checkpoint_every: 3}}
    launch: {{launcher: {launcher}, nproc_per_node: {per_node}, nnodes: {nodes}, backend: gloo}}
"""


def run_workflow(project: Path, launcher: str, per_node: int, nodes: int, env: dict | None = None,
                 prefix: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], str]:
    """`vlflow run` of WORKFLOW in a fresh project: (the committed model's weights, the committed stage logs)."""
    project.mkdir(parents=True, exist_ok=True)
    write_project_config(project)
    (project / "wf.yaml").write_text(WORKFLOW.format(launcher=launcher, per_node=per_node, nodes=nodes))
    done = subprocess.run([*prefix, VLFLOW, "run", "wf.yaml"], cwd=project, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=RUN_TIMEOUT)
    logs = "\n".join(path.read_text()[-3000:] for path in (project / "state").rglob("*.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    shards = sorted((project / "cache").rglob("model/*.safetensors"))
    assert shards, f"no committed model under {project / 'cache'}"
    weights = {}
    for shard in shards:
        weights.update(load_file(shard))
    return weights, "\n".join(path.read_text() for path in (project / "cache").rglob("_vlflow/stage.log"))


def assert_identical(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: the same stage on 2 ranks launched by torchrun."""
    return run_workflow(tmp_path_factory.mktemp("torchrun"), "torchrun", per_node=2, nodes=1)[0]


# ---------------------------------------------------------------------------------------------------------------
# Open MPI

@pytest.mark.dist
def test_mpirun_trains_two_real_ranks_like_torchrun(tmp_path, mpirun_available, torchrun_weights):
    weights, logs = run_workflow(tmp_path, "mpirun", per_node=2, nodes=1)
    assert "# mpirun -np 2" in logs and "--launcher openmpi" in logs
    assert_identical(weights, torchrun_weights)


def test_mpirun_settings_for_root_and_small_machines(tmp_path, monkeypatch):
    launch = LaunchSpec(launcher="mpirun", nproc_per_node=(os.cpu_count() or 1) + 1)
    command = build_command(launch, tmp_path / "p.json", python="py")
    assert "--oversubscribe" in command  # more ranks than cores: mpirun refuses without it
    assert command[command.index("--bind-to") + 1] == "none"  # one core per rank would starve its threads
    chosen = build_command(launch.model_copy(update={"extra_args": ["--bind-to", "socket"], "nproc_per_node": 1}),
                           tmp_path / "p.json", python="py")
    assert chosen.count("--bind-to") == 1 and "--oversubscribe" not in chosen
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert launcher_env(launch) == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert launcher_env(LaunchSpec(launcher="torchrun")) == {}
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert launcher_env(launch) == {}


# ---------------------------------------------------------------------------------------------------------------
# Slurm: srun inside an allocation of both fake nodes

@pytest.mark.dist
def test_srun_inside_salloc_trains_one_rank_per_node_like_torchrun(tmp_path, slurm_cluster, torchrun_weights):
    weights, logs = run_workflow(tmp_path, "slurm", per_node=1, nodes=2, env=slurm_cluster,
                                 prefix=("salloc", "--nodes=2", "--quiet", "--time=5"))
    assert "# srun --nodes 2 --ntasks-per-node 1 --ntasks 2" in logs and "--launcher slurm" in logs
    assert_identical(weights, torchrun_weights)


@pytest.mark.dist
def test_torchrun_inside_salloc_starts_one_agent_per_node_like_single_node_torchrun(tmp_path, slurm_cluster,
                                                                                  torchrun_weights):
    weights, logs = run_workflow(tmp_path, "torchrun", per_node=1, nodes=2, env=slurm_cluster,
                                 prefix=("salloc", "--nodes=2", "--quiet", "--time=5"))
    assert "# srun --nodes 2 --ntasks-per-node 1 --ntasks 2 --kill-on-bad-exit=1 bash -c " in logs
    assert "--nnodes 2 --master_addr 127.0.0.1 --master_port " in logs  # n1's address, a port every node shares
    assert_identical(weights, torchrun_weights)


def test_torchrun_across_nodes_is_started_by_srun_only_inside_an_allocation(tmp_path, monkeypatch, slurm_cluster):
    launch = LaunchSpec(launcher="torchrun", nproc_per_node=4, nnodes=2)
    for name, value in slurm_cluster.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(JOIN_DIR_ENV, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "10")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    command = build_command(launch, tmp_path / "p.json", python="py")
    script = command[command.index("-c") + 1]
    assert command[:command.index("-c") + 2] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--ntasks", "2",
                                                 "--kill-on-bad-exit=1", "--cpus-per-task=10", "bash", "-c", script]
    # one agent per node, the node's rank from Slurm; the same arguments otherwise on every node
    assert re.search(r'exec "\$0" -m torch.distributed.run --node_rank "\$SLURM_NODEID" "\$@"', script)
    arguments = command[command.index(script) + 1:]
    assert arguments[0] == "py" and "--node_rank" not in arguments
    assert arguments[arguments.index("--master_addr") + 1] == "127.0.0.1"  # the first node (n1) hosts rank 0
    assert int(arguments[arguments.index("--master_port") + 1]) > 0  # master_port 0: one free port for all nodes
    on_node_2 = subprocess.run(["bash", "-c", script, "echo", "--nnodes", "2"], capture_output=True, text=True,
                               env=dict(os.environ, SLURM_NODEID="1"), timeout=30)
    assert on_node_2.stdout == "-m torch.distributed.run --node_rank 1 --nnodes 2\n"
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    with pytest.raises(LaunchError, match=r"nnodes 2, but the Slurm allocation \(job 7\) has 1 node\(s\)"):
        build_command(launch, tmp_path / "p.json", python="py")
    # torchrun started by hand on each node (the join recipe, or outside Slurm): no srun
    monkeypatch.setenv(JOIN_DIR_ENV, str(tmp_path / "join"))
    assert build_command(launch.model_copy(update={"master_port": 29500}), tmp_path / "p.json", python="py")[0] == "py"
    monkeypatch.delenv(JOIN_DIR_ENV)
    monkeypatch.delenv("SLURM_JOB_ID")
    assert build_command(launch.model_copy(update={"master_port": 29500}), tmp_path / "p.json", python="py")[0] == "py"


def test_master_address_comes_from_the_allocation(monkeypatch, slurm_cluster):
    launch = LaunchSpec(launcher="slurm", nnodes=2)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(LaunchError, match=r"needs master_addr .*\(run inside salloc or sbatch\)"):
        resolve_master_addr(launch)
    for name, value in slurm_cluster.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    assert resolve_master_addr(launch) == "127.0.0.1"  # n1's NodeAddr in scripts/cluster/start.sh
    assert resolve_master_addr(launch.model_copy(update={"master_addr": "10.0.0.7"})) == "10.0.0.7"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "nosuchnode")
    with pytest.raises(LaunchError, match="scontrol show node nosuchnode"):
        resolve_master_addr(launch)


# ---------------------------------------------------------------------------------------------------------------
# The cluster scripts

def test_cluster_scripts_start_two_nodes_and_stop_leaves_nothing_running(tmp_path, slurm_cluster):
    """A second cluster beside the session's: start.sh is idempotent on a healthy cluster, stop.sh ends every
    daemon it recorded."""
    if os.geteuid() != 0:
        missing_cluster_piece("scripts/cluster/start.sh needs root")
    state = tmp_path / "cluster"
    start = ["bash", str(CLUSTER_SCRIPTS / "start.sh"), str(state)]
    started = subprocess.run(start, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == str(state / "env.sh")
        pids = [int((state / "pids" / f"{name}.pid").read_text()) for name in ("slurmctld", "slurmd-n1", "slurmd-n2")]
        env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
        ranks = subprocess.run(["srun", "--nodes=2", "--ntasks=2", "--quiet", "bash", "-c",
                                "echo $SLURM_PROCID $SLURMD_NODENAME"],
                               env=env, capture_output=True, text=True, timeout=60)
        assert sorted(ranks.stdout.split("\n")[:2]) == ["0 n1", "1 n2"], ranks.stderr
        again = subprocess.run(start, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "already running" in again.stderr
        assert [int((state / "pids" / f"{name}.pid").read_text())
                for name in ("slurmctld", "slurmd-n1", "slurmd-n2")] == pids
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(state)], capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"] == []
    assert subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(state)], timeout=60).returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Interrupts leave no rank behind

def two_node_allocation(cluster_env: dict) -> dict:
    """An allocation of both fake nodes held without a shell (salloc --no-shell), as the environment a process
    inside it sees; the caller scancels SLURM_JOB_ID."""
    granted = subprocess.run(["salloc", "--no-shell", "--nodes=2", "--time=5"], env=dict(os.environ, **cluster_env),
                             capture_output=True, text=True, timeout=60)
    job = re.search(r"Granted job allocation (\d+)", granted.stderr)
    assert job, granted.stderr
    return {**cluster_env, "SLURM_JOB_ID": job[1], "SLURM_JOB_NODELIST": "n[1-2]"}


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["mpirun", "slurm", "torchrun"])
def test_interrupt_stops_every_mpirun_srun_and_torchrun_rank(tmp_path, launcher, request):
    """Also torchrun across both nodes inside an allocation: no agent (srun's task) nor rank is left behind."""
    from tests.engine.launch.test_launch import make_payload, processes_mentioning
    from vlflow.launch import run_distributed
    from vlflow.stage import get_spec

    cluster_env = request.getfixturevalue("mpirun_available" if launcher == "mpirun" else "slurm_cluster") or {}
    launch = LaunchSpec(launcher=launcher, nproc_per_node=2, backend="gloo")
    if launcher == "torchrun":
        cluster_env = two_node_allocation(cluster_env)
        request.addfinalizer(lambda: subprocess.run(["scancel", cluster_env["SLURM_JOB_ID"]], timeout=60,
                                                    env=dict(os.environ, **cluster_env)))
        launch = LaunchSpec(launcher="torchrun", nnodes=2, backend="gloo")
    payload = make_payload(tmp_path, launch, {"steps": 200, "checkpoint_every": 2, "sleep": 0.2})

    def interrupt_after_first_checkpoint(line: str) -> None:
        if "checkpoint saved at step" in line:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        for name, value in cluster_env.items():
            patch.setenv(name, value)
        with pytest.raises(KeyboardInterrupt):
            run_distributed(get_spec("testing.train"), payload, launch, tmp_path / "log.txt",
                            env={"OMP_NUM_THREADS": "1"}, on_line=interrupt_after_first_checkpoint)
    deadline = time.monotonic() + 30  # srun's ranks are children of slurmstepd, which ends them a moment later
    while processes_mentioning(str(payload)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(payload)) == []
    if launcher == "torchrun":
        assert "# srun --nodes 2 --ntasks-per-node 1 --ntasks 2 " in (tmp_path / "log.txt").read_text()
