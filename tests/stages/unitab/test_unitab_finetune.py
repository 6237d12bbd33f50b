"""unitab.pretrain on Flickr30k + MDETR's mixed data, then unitab.finetune_grounding from its output, both through the
one training loop (in process, a single-process CPU booster; tiny model and data)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from vlflow.stages.data.arrow_grounding import convert_grounding, convert_grounding_mixed
from vlflow.stages.data.reader import GroundingArrowDataset
from vlflow.stages.data.spec import (
    GroundingArrowParams,
    GroundingMixedArrowParams,
    SyntheticFlickrParams,
    SyntheticMdetrMixedParams,
)
from vlflow.stages.data.synthetic import generate_flickr30k, generate_mdetr_mixed
from vlflow.stages.text.tokenizer import train_bpe
from vlflow.stages.unitab.spec import FinetuneGroundingParams, PretrainParams
from vlflow.stages.unitab.train import finetune_grounding, pretrain

from vlflow.stage import StageContext

torch.set_num_threads(1)

TINY_MODEL = dict(backbone="resnet10t", backbone_feature_level=-3, backbone_norm="batch_norm",
                  text_encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=80),
                  d_model=32, enc_layers=1, dec_layers=1, nheads=2, dim_feedforward=64, dropout=0.0, num_queries=16,
                  max_decoding_step=64)
TINY_TRAINING = dict(image_size=32, max_image_size=48, augment="none", batch_size=4, per_device_batch_size=4,
                     ema_decay=0.5, log_every=1, checkpoint_every=1000, seed=0)


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group: the stages run under torch_ddp as the launcher would start them."""
    import torch.distributed as dist

    from vlflow.launch.command import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run(stage, params, inputs: dict, tmp_path, name: str) -> tuple[dict, object]:
    from vlflow.launch.booster import make_booster
    from vlflow.stage import LaunchSpec

    launch = LaunchSpec(backend="gloo", plugin="torch_ddp", precision="fp32")
    booster, plugin = make_booster(launch)
    ctx = StageContext(stage=name, params=params, inputs=inputs, output_dir=tmp_path / name, launch=launch,
                       work_dir=tmp_path / f"{name}.work", booster=booster, plugin=plugin, log=logging.getLogger(name))
    return stage(ctx), ctx.output_dir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_rank):
    tmp = tmp_path_factory.mktemp("unitab_finetune")
    generate_flickr30k(tmp / "flickr", SyntheticFlickrParams(num_images=10, image_size=48, captions_per_image=2,
                                                              splits={"train": 6, "val": 2, "test": 2}))
    convert_grounding(tmp / "flickr", tmp / "arrows", GroundingArrowParams())
    generate_mdetr_mixed(tmp / "mixed", SyntheticMdetrMixedParams(num_images=4, image_size=48, captions_per_image=2))
    convert_grounding_mixed(tmp / "mixed", tmp / "mixed_arrows", GroundingMixedArrowParams())
    captions = [GroundingArrowDataset([path]).caption(i) for path in sorted((tmp / "arrows").glob("*.arrow"))
                for i in range(len(GroundingArrowDataset([path])))]
    train_bpe(iter(captions), vocab_size=200, lowercase=True, min_frequency=1).save_pretrained(str(tmp / "tok"))
    params = PretrainParams(**TINY_MODEL, **TINY_TRAINING, freeze_backbone_stem=False, max_steps=3)
    metrics, out = run(pretrain, params, {"arrows": tmp / "arrows", "mixed": tmp / "mixed_arrows",
                                          "tokenizer": tmp / "tok"}, tmp, "pretrain")
    return tmp, metrics, out


def test_pretraining_adds_the_mixed_train_split_to_flickrs(pretrained):
    tmp, metrics, _ = pretrained
    flickr = len(GroundingArrowDataset([tmp / "arrows" / "f30k_grounding_train.arrow"]))
    mixed = len(GroundingArrowDataset([tmp / "mixed_arrows" / "mixed_grounding_train.arrow"]))
    assert (flickr, mixed) == (12, 8)
    assert metrics["train_captions"] == flickr + mixed and metrics["steps"] == 3


def test_finetuning_starts_from_the_pretrained_ema_weights(pretrained, one_rank):
    tmp, _, pretrained_dir = pretrained
    # one step at a negligible lr: the fine-tuned weights are the weights it started from
    params = FinetuneGroundingParams(**TINY_TRAINING | {"ema": False}, lr=1e-12, lr_backbone=0, text_encoder_lr=0,
                                     weight_decay=0, max_steps=1)
    inputs = {"arrows": tmp / "arrows", "model": pretrained_dir}
    for start_from_ema, source in ((True, "ema.pt"), (False, "model.pt")):
        metrics, out = run(finetune_grounding, params.model_copy(update={"start_from_ema": start_from_ema}), inputs,
                           tmp, f"finetune_{source}")
        assert metrics["started_from"] == source and metrics["train_captions"] == 12  # Flickr30k only
        start = torch.load(pretrained_dir / source, weights_only=True)
        tuned = torch.load(out / "model.pt", weights_only=True)
        assert tuned.keys() == start.keys()
        for name in start:  # (trainable BatchNorm statistics move with the step's batch: not weights)
            if "running_" not in name and "num_batches_tracked" not in name:
                torch.testing.assert_close(tuned[name], start[name], rtol=0, atol=1e-6, msg=name)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_params"]["freeze_backbone_stem"] is False  # taken from the pretrained model
    assert saved["model"]["d_model"] == 32 and (out / "tokenizer").is_dir()
    assert not torch.equal(torch.load(pretrained_dir / "ema.pt")["token_embed.weight"],
                           torch.load(pretrained_dir / "model.pt")["token_embed.weight"])  # the two starts differ


def test_finetuning_lowers_the_grounding_loss(pretrained, one_rank):
    from vlflow.stages.unitab.data import GroundingSequenceDataset, collate, open_split
    from vlflow.stages.unitab.model import sequence_loss
    from vlflow.stages.unitab.train import MODEL_INPUTS, load_trained

    tmp, _, pretrained_dir = pretrained
    params = FinetuneGroundingParams(**TINY_TRAINING, lr=3e-3, lr_backbone=1e-3, text_encoder_lr=1e-3, max_steps=12,
                                     lr_schedule="all_linear_with_warmup")
    _, out = run(finetune_grounding, params, {"arrows": tmp / "arrows", "model": pretrained_dir}, tmp, "finetune")

    def grounding_loss(model_dir) -> float:
        model, tokenizer, config, _ = load_trained(model_dir)
        dataset = GroundingSequenceDataset(open_split(tmp / "arrows", "train"), tokenizer, config.layout,
                                           image_size=32, max_image_size=48, max_decoding_step=64, seqcrop="grounding")
        batch = collate([dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id)
        with torch.no_grad():
            return sequence_loss(model(*(batch[k] for k in MODEL_INPUTS)), batch["targets"]).item()

    before, after = grounding_loss(pretrained_dir), grounding_loss(out)
    print(f"grounding loss before {before:.3f} after {after:.3f}")
    assert after < 0.8 * before, (before, after)
