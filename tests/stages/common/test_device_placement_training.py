"""Every training stage's micro-step as the shared loop runs it on a GPU, on this CPU machine: host-side random choices
(masks, negatives, false captions) on the CPU batch, one move to the model's device, forward and losses there, with
the model's weights as fake CUDA tensors (fake_cuda.py here). A CPU tensor meeting a CUDA one anywhere raises
FakeTensorDeviceMismatchError, as a GPU would. Covers MLM, whole-word MLM, ITM, ITM+WPA, retrieval, VQA, UniTAB, the
EMA update and the all-reduced step loss. Backward cannot run on fake tensors: the forward decides the devices of
everything backward touches (labels, indices and masks are forward inputs)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from fake_cuda import CUDA, fake_cuda, to_fake_cuda
from transformers import ViltForImageAndTextRetrieval, ViltForQuestionAnswering
from vlflow.stages.common.fit import Ema, _mean_over_ranks, device_losses, host_batch
from vlflow.stages.text.tokenizer import train_bpe, train_wordpiece
from vlflow.stages.unitab.data import collate as unitab_collate
from vlflow.stages.unitab.model import UniTAB, UniTABConfig
from vlflow.stages.vilt.data import CaptionPairs, PairCollator, QuestionCollator
from vlflow.stages.vilt.model import (
    ViltPretrainingModel,
    ViltRetrievalTrainingModel,
    ViltVqaTrainingModel,
    build_config,
)
from vlflow.stages.vilt.spec import ViltPretrainParams
from vlflow.stages.vilt.train import pretrain_task, retrieval_task, vqa_task

from vlflow.stage import StageContext

torch.set_num_threads(1)

CAPTIONS = [["a red circle at the top left", "one red circle"],
            ["a blue square to the right of a green triangle", "blue square and green triangle"],
            ["a yellow triangle in the center", "the yellow triangle"],
            ["an orange circle below a purple square", "purple square above orange circle"]]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(iter([c for caps in CAPTIONS for c in caps] * 5), vocab_size=60, lowercase=True,
                           min_frequency=1)


@pytest.fixture(scope="module")
def params():
    return ViltPretrainParams(hidden_size=32, num_layers=1, num_heads=4, patch_size=16, image_size=64,
                              max_image_size=64, max_text_len=16, max_image_len=-1, mlp_ratio=2)


class FakeImages:
    """What CaptionPairs reads: images (CHW tensors) and their captions."""

    def __len__(self):
        return len(CAPTIONS)

    def captions(self, index):
        return CAPTIONS[index]

    def __getitem__(self, index):
        return {"image": torch.rand(3, 64, 64 if index % 2 else 48), "captions": CAPTIONS[index]}


@pytest.fixture(scope="module")
def pairs():
    return CaptionPairs(FakeImages())


@pytest.fixture(scope="module")
def batch(pairs, tokenizer, params):
    return PairCollator(tokenizer, params.max_text_len)([pairs[i] for i in range(len(pairs))])


def embed_all_patches(vilt, pixel_values, pixel_mask, max_image_len):
    """Stand-in for transformers' ViltEmbeddings.visual_embed, whose patch selection calls `unique()` and loops over
    its values, which fake tensors cannot run (the output shape depends on the data). The same weights and inputs:
    patch projection of pixel_values, image CLS token, mask pooled from pixel_mask; every patch kept. Whatever device
    pixel_values/pixel_mask are on reaches the backbone as it does through visual_embed."""
    embeddings = vilt.embeddings
    patches = embeddings.patch_embeddings(pixel_values)
    mask = F.interpolate(pixel_mask[:, None].float(), size=patches.shape[2:]).long()[:, 0].flatten(1)
    patches = patches.flatten(2).transpose(1, 2)
    image_embeds = torch.cat([embeddings.cls_token.expand(len(patches), -1, -1), patches], dim=1)
    return image_embeds, torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


@pytest.fixture(autouse=True)
def without_patch_sampling(monkeypatch):
    import vlflow.stages.vilt.model

    monkeypatch.setattr(vlflow.stages.vilt.model, "embed_images", embed_all_patches)


def on_fake_gpu(task, model, batch) -> dict:
    """The loop's micro-step (stages/common/fit.py): host_batch on the real CPU batch, then device_losses with the
    model on (fake) CUDA. Returns the losses, checked to live on the device."""
    prepared = host_batch(task, batch, torch.Generator().manual_seed(0))
    with fake_cuda():
        to_fake_cuda(model)
        out = device_losses(task, model, prepared, CUDA)
        assert out["loss"].device == CUDA and out["loss"].dtype == torch.float32
        for name, value in out.items():
            assert value.device == CUDA, name
        return out


@pytest.mark.parametrize("tasks, whole_word, wpa", [
    (["mlm"], False, 0.0), (["mlm"], True, 0.0), (["itm"], False, 0.0), (["mlm", "itm"], True, 0.1),
], ids=["mlm", "whole_word_mlm", "itm", "mlm_itm_wpa"])
def test_vilt_pretraining_step_keeps_to_the_model_device(tokenizer, params, batch, tasks, whole_word, wpa):
    torch.manual_seed(0)
    model = ViltPretrainingModel(build_config(params, len(tokenizer), tokenizer.pad_token_id), tasks)
    out = on_fake_gpu(pretrain_task(tokenizer, tasks, 0.3, whole_word, wpa), model, batch)
    expected = {"mlm": {"mlm_loss", "mlm_acc"}, "itm": {"itm_loss", "itm_acc"}}
    assert set(out) == {"loss"} | set().union(*(expected[t] for t in tasks)) | ({"itm_wpa_loss"} if wpa else set())


def test_vilt_retrieval_step_keeps_to_the_model_device(tokenizer, params, batch, pairs):
    config = build_config(params, len(tokenizer), tokenizer.pad_token_id)
    model = ViltRetrievalTrainingModel(ViltForImageAndTextRetrieval(config))
    out = on_fake_gpu(retrieval_task(tokenizer, pairs, 3, params.max_text_len), model, batch)
    assert set(out) == {"loss", "irtr_loss", "irtr_acc"}


def test_vilt_vqa_step_keeps_to_the_model_device(tokenizer, params, pairs):
    config = build_config(params, len(tokenizer), tokenizer.pad_token_id)
    config.id2label = {0: "yes", 1: "no", 2: "red"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = ViltVqaTrainingModel(ViltForQuestionAnswering(config))
    samples = [{**pairs[i], "answer_labels": [i % 3], "answer_scores": [1.0], "question_id": i} for i in range(4)]
    batch = QuestionCollator(tokenizer, params.max_text_len, 3)(samples)
    out = on_fake_gpu(vqa_task(), model, batch)
    assert set(out) == {"loss", "vqa_loss", "vqa_score"}


def unitab_model_and_batch():
    captions = ["a red circle next to a blue square", "two green triangles"] * 4
    tokenizer = train_bpe(iter(captions), vocab_size=300, lowercase=True, min_frequency=1)
    config = UniTABConfig(
        text_vocab=len(tokenizer), backbone="resnet10t", d_model=32, enc_layers=1, dec_layers=1, nheads=2,
        dim_feedforward=64, dropout=0.1, num_queries=20, max_decoding_step=40,
        text_encoder_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                 pad_token_id=tokenizer.pad_token_id),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = UniTAB(config)
    samples = []
    for i, caption in enumerate(captions[:3]):
        ids = tokenizer(caption)["input_ids"]
        sequence = ids[:-1] + [config.layout.obj_start] + config.layout.box_to_tokens([0.1, 0.2, 0.5, 0.6]) + ids[-1:]
        samples.append({"image": torch.rand(3, 32, 32 + 8 * i), "text_ids": ids, "prev_tokens": sequence[:-1],
                        "targets": sequence[1:], "epoch": 0})
    return model, unitab_collate(samples, pad_token_id=tokenizer.pad_token_id)


def test_unitab_step_and_ema_keep_to_the_model_device():
    from vlflow.stages.unitab.train import sequence_task

    model, batch = unitab_model_and_batch()
    ema = Ema(model, decay=0.9)  # made from the CPU model before boosting, as unitab.pretrain does
    ctx = StageContext(stage="pretrain", params=None, inputs={}, output_dir=None, log=logging.getLogger("test"))
    out = on_fake_gpu(sequence_task(), model, batch)
    with fake_cuda():
        ema.start(model, CUDA, None, ctx)  # the loop hands the EMA the model's device
        assert all(p.device == CUDA for p in ema.model.parameters())
        ema.after_step(model, 1)
        # the logged step loss is averaged over ranks on the device (an all-reduce of a CPU tensor fails under NCCL)
        means = _mean_over_ranks({"loss": [out["loss"].detach()], "lr": [torch.tensor(0.1)]}, CUDA)
    assert set(means) == {"loss", "lr"}


def test_a_cpu_tensor_meeting_a_cuda_one_is_caught():
    """The harness is not vacuous: the defect of the old pretraining step (ITM labels made on the CPU, logits on
    the GPU) raises here."""
    from fake_cuda import FakeTensorDeviceMismatchError

    with fake_cuda(), pytest.raises(FakeTensorDeviceMismatchError):
        logits = torch.randn(4, 2, device=CUDA)
        torch.nn.functional.cross_entropy(logits, torch.ones(4, dtype=torch.long))
