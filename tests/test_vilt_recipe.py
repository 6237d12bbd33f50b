"""The ViLT recipe as the stages and coco_vilt.yaml say it: run length in epochs or steps, fine-tuning with every
patch, the paper's retrieval fine-tune (10 epochs at batch 256)."""
from pathlib import Path

import pydantic
import pytest
from vlflow.stages.common.fit import training_steps
from vlflow.stages.common.training import ResumableSampler
from vlflow.stages.vilt.spec import ViltFinetuneRetrievalParams, ViltFinetuneVqaParams, ViltPretrainParams

from vlflow.workflow import load_workflow

ROOT = Path(__file__).resolve().parent.parent
COCO_TRAIN_PAIRS = 566_747  # Karpathy train + restval captions (113,287 images), ViLT's irtr training pairs


def test_training_steps_from_epochs_or_steps():
    assert training_steps(1000, 10, 50, 2) == 1000  # max_steps wins
    assert training_steps(None, 10, 50, 2) == 250  # 10 epochs of 50 micro-batches, 2 per optimizer step
    assert training_steps(None, 1, 3, 4) == 1  # at least one step
    # ViLT's COCO irtr fine-tune on 8 ranks x 4 per device at global batch 256: 8 micro-batches per step
    per_rank = ResumableSampler(COCO_TRAIN_PAIRS, 4, 0, 8).batches_per_epoch
    assert training_steps(None, 10, per_rank, 8) == 22_137  # the paper's ~22.1k steps


def test_params_need_a_length_and_fine_tuning_defaults_are_vilts():
    with pytest.raises(pydantic.ValidationError, match="max_steps or max_epochs"):
        ViltPretrainParams(max_steps=None)
    assert ViltPretrainParams().max_steps == 200_000 and ViltPretrainParams().max_image_len == 200
    assert ViltPretrainParams().warmup_steps == 2500  # ViLT's config default (not 10% of 200k)
    for params in (ViltFinetuneRetrievalParams(), ViltFinetuneVqaParams()):
        assert (params.max_steps, params.max_epochs, params.batch_size, params.max_image_len) == (None, 10, 256, -1)
    assert ViltFinetuneRetrievalParams().false_texts == 15
    assert ViltPretrainParams().layer_norm_eps == 1e-6  # timm's ViT (ViLT); transformers' ViltConfig has 1e-12


def test_coco_vilt_workflow_fine_tunes_as_the_paper():
    workflow = load_workflow(ROOT / "workflows" / "coco_vilt.yaml")
    pretrain = workflow.stages["pretrain"].params
    assert (pretrain["max_steps"], pretrain["batch_size"], pretrain["max_image_len"]) == (200_000, 4096, 200)
    assert pretrain["warmup_steps"] == 2500 and pretrain["whole_word_masking"] and pretrain["itm_wpa"]
    for name in ("finetune", "finetune_vqa"):
        params = workflow.stages[name].params
        assert (params["max_steps"], params["max_epochs"], params["batch_size"], params["max_image_len"]) == \
            (None, 10, 256, -1), name
    assert workflow.stages["finetune"].params["false_texts"] == 15
