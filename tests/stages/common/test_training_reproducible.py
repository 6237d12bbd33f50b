"""Issue 17, training side: a training stage's data (its artifact but `_vlflow/`) is a pure function of its key, so a
forced rerun reproduces its data digest and what is downstream stays cached. testing.train on 2 gloo ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_project_config
from vlflow.store import ArtifactStore

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

WORKFLOW = """
name: repro
defaults:
  launch: {nproc_per_node: 2, backend: gloo}
stages:
  train: {uses: testing.train, with: {steps: 6, checkpoint_every: 4}}
  after: {uses: testing.train, inputs: {data: train}, with: {steps: 2}}  # its data: a hash of train's files
"""


def run(project: Path, *args: str) -> str:
    proc = subprocess.run([VLFLOW, "run", "wf.yaml", *args], cwd=project, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def train_manifest(project: Path):
    return next(m for m in ArtifactStore(str(project / "cache")).list() if m.meta["stage"] == "train")


@pytest.mark.dist
def test_forced_rerun_of_a_training_stage_reproduces_its_data_and_leaves_downstream_cached(tmp_path):
    project = tmp_path
    write_project_config(project)
    (project / "wf.yaml").write_text(WORKFLOW)
    assert "2 ran" in run(project)
    first = train_manifest(project)
    files = {entry.path for entry in first.files}
    assert any(path.startswith("model") for path in files)
    # timings, TensorBoard events (time + host in the file name) are bookkeeping, not data
    assert "_vlflow/metrics.jsonl" in files and any(p.startswith("_vlflow/tensorboard/") for p in files)
    assert not any("tensorboard" in p or "metrics.jsonl" in p for p in files if not p.startswith("_vlflow/"))

    out = run(project, "--force", "train", "--until", "train", "--state-dir", str(tmp_path / "fresh_state"))
    assert "1 ran" in out, out
    again = train_manifest(project)
    assert again.meta["started"] != first.meta["started"]  # it did run again
    assert again.data_digest == first.data_digest
    out = run(project)
    assert "0 ran, 2 cached" in out, out
