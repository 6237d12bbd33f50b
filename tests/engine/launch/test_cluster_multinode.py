"""torchrun across machines without Slurm (two "nodes" on 127.0.0.1): node 0's `vlflow run` runs every stage and
commits it once; node 1 runs `python -m vlflow.launch.join` and only joins the distributed launches node 0 announces
in the shared VLFLOW_JOIN_DIR. A `vlflow run` told it is node 1 is refused with the way to join instead."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port, write_project_config

VLFLOW = str(Path(sys.executable).with_name("vlflow"))
TIMEOUT = 240

WORKFLOW = """
name: multinode
stages:
  data: {{uses: testing.write, with: {{files: 2}}}}
  train:
    uses: testing.train
    inputs: {{data: data}}
    with: {{steps: 4, checkpoint_every: 2}}
    launch: {{nproc_per_node: 1, nnodes: 2, node_rank: {node_rank}, master_port: {port}, backend: gloo}}
"""


def project(tmp_path: Path, node_rank: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(WORKFLOW.format(node_rank=node_rank, port=free_port()))
    return tmp_path


def vlflow_run(root: Path, join_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([VLFLOW, "run", "wf.yaml"], cwd=root, capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", VLFLOW_JOIN_DIR=str(join_dir)))


def test_node0_runs_and_commits_every_stage_once_and_node1_only_joins_training(tmp_path):
    root, join_dir = project(tmp_path / "project", node_rank=0), tmp_path / "join"
    joiner = subprocess.Popen([sys.executable, "-m", "vlflow.launch.join", "--node-rank", "1", str(join_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        first = vlflow_run(root, join_dir)
        again = vlflow_run(root, join_dir)  # everything cached: nothing to run, nothing announced
    finally:
        joiner.send_signal(signal.SIGTERM)
        joined = joiner.communicate(timeout=60)[0]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + joined
    assert again.returncode == 0, again.stderr[-3000:]
    # node 0's static rendezvous waits for all nodes, so a finished training proves node 1 took part
    assert joined.count("joining stage train (testing.train) as node 1 of 2") == 1, joined
    assert "stage train done on node 1" in joined and "stage data" not in joined
    assert joiner.returncode == 130  # stopped by SIGTERM while waiting
    assert list(join_dir.glob("*.json")) == []  # node 0 withdrew the announcement when the launch ended
    assert "--node_rank 1" in next(join_dir.glob("*.node1.log")).read_text()
    assert len(list((root / "cache").rglob("model/*.safetensors"))) == 1  # one committed training


def test_vlflow_run_as_another_node_is_refused_with_the_way_to_join(tmp_path):
    root = project(tmp_path, node_rank=1)
    done = vlflow_run(root, tmp_path / "join")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "node_rank 1: only node 0 runs `vlflow run`" in output
    assert "python -m vlflow.launch.join --node-rank 1 JOIN_DIR" in output
    assert "Traceback" not in output
    assert not list((root / "cache").rglob("model"))  # nothing trained, nothing committed
