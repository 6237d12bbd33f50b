"""End-to-end: `vlflow run workflows/tiny_unitab.yaml` (synthetic Flickr30k -> grounding arrows -> BPE tokenizer ->
UniTAB pretraining under torchrun/Colossal-AI torch_ddp on 2 CPU ranks -> evaluation) learns to ground phrases far
better than chance, within the time budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLFLOW = str(Path(sys.executable).with_name("vlflow"))
TIME_LIMIT_S = 600  # the goal: the whole tiny workflow in <= 10 minutes on 2 CPU cores


@pytest.mark.slow
@pytest.mark.dist
def test_tiny_unitab_workflow_grounds_phrases(tmp_path):
    (tmp_path / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    done = subprocess.run([VLFLOW, "run", str(REPO / "workflows" / "tiny_unitab.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIME_LIMIT_S * 2)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    metrics_files = list((tmp_path / "cache").rglob("metrics.json"))
    assert len(metrics_files) == 1, metrics_files
    metrics = json.loads(metrics_files[0].read_text())
    print(json.dumps(metrics, indent=1), f"elapsed {elapsed:.0f}s")

    assert metrics["weights"] == "ema" and metrics["phrases"] >= 100
    recall, random_recall = metrics["grounding_recall@1"], metrics["random_box_recall@1"]
    assert recall >= 0.3, metrics
    assert recall >= 3 * random_recall and recall > metrics["center_box_recall@1"] + 0.2, metrics
    assert 0.0 <= metrics["bleu4"] <= 1.0 and metrics["cider"] >= 0.0
    assert elapsed <= TIME_LIMIT_S, f"tiny workflow took {elapsed:.0f}s (> {TIME_LIMIT_S}s)"
