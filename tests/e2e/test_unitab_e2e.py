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

from tests.conftest import REPO_ROOT

REPO = REPO_ROOT
VLFLOW = str(Path(sys.executable).with_name("vlflow"))
TIME_LIMIT_S = 600  # the goal: the whole tiny workflow in <= 10 minutes on 2 CPU cores


@pytest.mark.slow
@pytest.mark.dist
def test_tiny_unitab_workflow_grounds_phrases(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    command = [VLFLOW, "run", str(REPO / "workflows" / "tiny_unitab.yaml"),
               "--cache", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIME_LIMIT_S * 2)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    # the evaluate stage's own metrics.json (the runner keeps a copy of every stage's metrics under _vlflow/)
    evaluations = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("metrics.json")
                   if "_vlflow" not in p.parts]
    evaluations = [m for m in evaluations if "anybox_oracle_recall@1" in m]
    assert len(evaluations) == 1, evaluations
    metrics = evaluations[0]
    print(json.dumps(metrics, indent=1), f"elapsed {elapsed:.0f}s")

    assert metrics["weights"] == "ema" and metrics["phrases"] >= 100
    recall, random_recall = metrics["anybox_oracle_recall@1"], metrics["random_box_recall@1"]
    assert recall >= 0.3, metrics
    assert recall >= 3 * random_recall and recall > metrics["center_box_recall@1"] + 0.2, metrics
    # the paper's protocol (free decoding, MERGED box): 0.509 measured (anybox 0.511) after issue 14's changes
    assert metrics["merged_recall@1"] >= 0.3 and metrics["merged_recall@1"] >= 3 * random_recall, metrics
    assert 0.0 <= metrics["bleu4"] <= 1.0 and metrics["cider"] >= 0.0
    assert elapsed <= TIME_LIMIT_S, f"tiny workflow took {elapsed:.0f}s (> {TIME_LIMIT_S}s)"

    # a second run of the same workflow on the same cache reuses every stage
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert ", 0 ran," in again.stdout, again.stdout[-4000:]
