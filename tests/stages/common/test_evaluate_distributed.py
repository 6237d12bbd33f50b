"""The evaluation stages on 2 gloo ranks (each takes half of the items) give what the same evaluation gives on 1 rank:
`vilt.evaluate_retrieval` its scores and recalls, `unitab.evaluate` its boxes, captions and metrics. Real launches;
tiny models trained for a few steps so that the predictions are not all alike."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TEST_DATA, write_project_config
from vlflow.store import ArtifactStore

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

WORKFLOWS = TEST_DATA / "workflows"
# fewer training steps than the resume tests need; all patches (no random patch sampling at evaluation)
VILT = ["--set", "stages.pretrain.with.max_steps=4", "--set", "stages.pretrain.with.max_image_len=-1"]
UNITAB = ["--set", "stages.pretrain.with.max_steps=6"]


def _evaluate(project: Path, *args: str) -> Path:
    """Run the workflow with ARGS; a copy of the evaluate stage's committed output."""
    result = subprocess.run([VLFLOW, "run", "wf.yaml", *args], cwd=project, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    store = ArtifactStore(str(project / "cache"))
    manifest = next(m for m in store.list() if m.meta["stage"] == "evaluate")
    return Path(shutil.copytree(store.materialize(manifest.key),
                                project / f"evaluate_{len(list(project.glob('evaluate_*')))}"))


def _one_rank_then_two(project: Path, workflow: str, overrides: list[str]) -> tuple[Path, Path]:
    write_project_config(project)
    shutil.copy(WORKFLOWS / workflow, project / "wf.yaml")
    # the number of ranks is not part of the stage's cache key (it must not change the result): the second
    # evaluation is forced
    one = _evaluate(project, *overrides, "--set", "stages.evaluate.launch.nproc_per_node=1")
    two = _evaluate(project, *overrides, "--force", "evaluate")
    return one, two


@pytest.mark.dist
def test_vilt_retrieval_on_two_ranks_scores_like_one(tmp_path):
    one, two = _one_rank_then_two(tmp_path, "small_vilt.yaml", VILT)
    one_metrics, two_metrics = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    one_scores, two_scores = (torch.load(d / "scores.pt", weights_only=True) for d in (one, two))
    assert (one_metrics["ranks"], two_metrics["ranks"]) == (1, 2)
    assert one_scores["scores"].shape == (one_metrics["num_texts"], 9)
    assert torch.equal(one_scores["text_image"], two_scores["text_image"])
    assert one_scores["scores"].std() > 0  # a trained model: the columns are told apart only if they differ
    torch.testing.assert_close(two_scores["scores"], one_scores["scores"], rtol=1e-5, atol=1e-5)
    assert two_metrics["all"] == pytest.approx(one_metrics["all"])


@pytest.mark.dist
def test_unitab_evaluation_on_two_ranks_predicts_like_one(tmp_path):
    one, two = _one_rank_then_two(tmp_path, "small_unitab.yaml", UNITAB)
    one_metrics, two_metrics = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (one_metrics.pop("ranks"), two_metrics.pop("ranks")) == (1, 2)
    assert one_metrics["phrases"] > 9 and one_metrics["images"] == 9
    assert two_metrics == pytest.approx(one_metrics)
    one_predictions, two_predictions = ((d / "predictions.jsonl").read_text().splitlines() for d in (one, two))
    # one line per phrase and grounding protocol (anybox_oracle, merged_free_decoding), one per image caption
    assert len(one_predictions) == 2 * one_metrics["phrases"] + 9
    boxes = {tuple(json.loads(line)["box"]) for line in one_predictions if "anybox_oracle" in line}
    assert len(boxes) > 1  # the model's boxes differ between phrases: the order is checked, not just the count
    assert two_predictions == one_predictions
