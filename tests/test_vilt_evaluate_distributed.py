"""`vilt.evaluate_retrieval` on 2 gloo ranks (each scores half of the images) gives the scores and recalls of the same
evaluation on 1 rank. Real launches; a tiny model pretrained for a few steps so the scores are not all equal."""
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

WORKFLOW = """
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


def _evaluate(project: Path, *args: str) -> tuple[dict, dict]:
    """Run the workflow with ARGS; (metrics, scores.pt) of the evaluate stage's committed output."""
    result = subprocess.run([VLFLOW, "run", "wf.yaml", *args], cwd=project, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    store = ArtifactStore(str(project / "cache"))
    manifest = next(m for m in store.list() if m.meta["stage"] == "evaluate")
    output = store.materialize(manifest.key)
    copy = shutil.copytree(output, project / f"evaluate_{len(list(project.glob('evaluate_*')))}")
    return json.loads((copy / "metrics.json").read_text()), torch.load(copy / "scores.pt", weights_only=True)


@pytest.mark.dist
def test_two_ranks_score_like_one(tmp_path):
    (tmp_path / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    # the number of ranks is not part of the stage's cache key (it must not change the result): the second
    # evaluation is forced
    one_metrics, one_scores = _evaluate(tmp_path, "--set", "stages.evaluate.launch.nproc_per_node=1")
    two_metrics, two_scores = _evaluate(tmp_path, "--force", "evaluate")
    assert (one_metrics["ranks"], two_metrics["ranks"]) == (1, 2)
    assert one_scores["scores"].shape == (one_metrics["num_texts"], 15)
    assert torch.equal(one_scores["text_image"], two_scores["text_image"])
    assert one_scores["scores"].std() > 0  # a trained model: the columns are told apart only if they differ
    torch.testing.assert_close(two_scores["scores"], one_scores["scores"], rtol=1e-5, atol=1e-5)
    assert two_metrics["all"] == pytest.approx(one_metrics["all"])
