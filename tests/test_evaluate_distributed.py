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

from vlflow.store import ArtifactStore

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

VILT = """
name: eval_ranks
defaults:
  launch: {nproc_per_node: 2, plugin: torch_ddp, precision: fp32, backend: gloo}
stages:
  data:
    uses: synthetic.coco
    # 15 test images: an odd count, so one rank scores one image more than the other
    with: {num_images: 60, image_size: 64, splits: {train: 40, restval: 0, val: 5, test: 15}}
  arrows: {uses: arrow.coco_karpathy, inputs: {root: data}}
  tokenizer: {uses: tokenizer.train, inputs: {arrows: arrows}, with: {kind: wordpiece, vocab_size: 120}}
  pretrain:
    uses: vilt.pretrain
    inputs: {arrows: arrows, tokenizer: tokenizer}
    with: {hidden_size: 32, num_layers: 1, num_heads: 2, patch_size: 16, mlp_ratio: 2, image_size: 64,
           max_image_size: 64, max_text_len: 24, max_image_len: -1, max_steps: 4, batch_size: 8,
           per_device_batch_size: 4, lr: 1.0e-3, checkpoint_every: 10, log_every: 2, num_workers: 0}
  evaluate:
    uses: vilt.evaluate_retrieval
    inputs: {arrows: arrows, model: pretrain}
    with: {split: test, subsets: [all], text_batch_size: 16}
"""

UNITAB = """
name: eval_ranks_unitab
defaults:
  launch: {nproc_per_node: 2, plugin: torch_ddp, precision: fp32, backend: gloo}
stages:
  data: {uses: synthetic.flickr30k, with: {num_images: 40, image_size: 64, splits: {train: 30, val: 3, test: 7}}}
  arrows: {uses: arrow.grounding, inputs: {root: data}}
  tokenizer: {uses: tokenizer.train, inputs: {arrows: arrows}, with: {kind: bpe, vocab_size: 300}}
  pretrain:
    uses: unitab.pretrain
    inputs: {arrows: arrows, tokenizer: tokenizer}
    with:
      backbone: resnet10t
      backbone_feature_level: -3
      backbone_norm: batch_norm
      text_encoder_config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64,
                            max_position_embeddings: 80}
      d_model: 32
      enc_layers: 1
      dec_layers: 1
      nheads: 2
      dim_feedforward: 64
      num_queries: 16
      max_decoding_step: 48
      image_size: 32
      max_image_size: 32
      batch_size: 8
      per_device_batch_size: 4
      max_steps: 6
      checkpoint_every: 10
      log_every: 2
  evaluate:
    uses: unitab.evaluate
    inputs: {arrows: arrows, model: pretrain}
    with: {split: test, batch_size: 4, max_decoding_step: 12}
"""


def _evaluate(project: Path, *args: str) -> Path:
    """Run the workflow with ARGS; a copy of the evaluate stage's committed output."""
    result = subprocess.run([VLFLOW, "run", "wf.yaml", *args], cwd=project, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    store = ArtifactStore(str(project / "cache"))
    manifest = next(m for m in store.list() if m.meta["stage"] == "evaluate")
    return Path(shutil.copytree(store.materialize(manifest.key),
                                project / f"evaluate_{len(list(project.glob('evaluate_*')))}"))


def _one_rank_then_two(project: Path, workflow: str) -> tuple[Path, Path]:
    (project / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    (project / "wf.yaml").write_text(workflow)
    # the number of ranks is not part of the stage's cache key (it must not change the result): the second
    # evaluation is forced
    one = _evaluate(project, "--set", "stages.evaluate.launch.nproc_per_node=1")
    two = _evaluate(project, "--force", "evaluate")
    return one, two


@pytest.mark.dist
def test_vilt_retrieval_on_two_ranks_scores_like_one(tmp_path):
    one, two = _one_rank_then_two(tmp_path, VILT)
    one_metrics, two_metrics = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    one_scores, two_scores = (torch.load(d / "scores.pt", weights_only=True) for d in (one, two))
    assert (one_metrics["ranks"], two_metrics["ranks"]) == (1, 2)
    assert one_scores["scores"].shape == (one_metrics["num_texts"], 15)
    assert torch.equal(one_scores["text_image"], two_scores["text_image"])
    assert one_scores["scores"].std() > 0  # a trained model: the columns are told apart only if they differ
    torch.testing.assert_close(two_scores["scores"], one_scores["scores"], rtol=1e-5, atol=1e-5)
    assert two_metrics["all"] == pytest.approx(one_metrics["all"])


@pytest.mark.dist
def test_unitab_evaluation_on_two_ranks_predicts_like_one(tmp_path):
    one, two = _one_rank_then_two(tmp_path, UNITAB)
    one_metrics, two_metrics = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (one_metrics.pop("ranks"), two_metrics.pop("ranks")) == (1, 2)
    assert one_metrics["phrases"] > 7 and one_metrics["images"] == 7
    assert two_metrics == pytest.approx(one_metrics)
    one_predictions, two_predictions = ((d / "predictions.jsonl").read_text().splitlines() for d in (one, two))
    assert len(one_predictions) == one_metrics["phrases"] + 7  # one line per phrase, one per image caption
    boxes = {tuple(json.loads(line)["box"]) for line in one_predictions if "box" in line}
    assert len(boxes) > 1  # the model's boxes differ between phrases: the order is checked, not just the count
    assert two_predictions == one_predictions
