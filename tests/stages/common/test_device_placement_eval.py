"""Every evaluator's forward path on a (fake) GPU: the model goes where the stage puts it (`stage_device()`), and no
CPU tensor meets a CUDA one in retrieval scoring (ITM and rank heads), VQA answering, UniTAB grounding and captioning.
fake_cuda.py (beside it) makes the device CUDA on this CPU machine and raises where devices mix, as a real GPU would.
Also: the helper itself catches mixing, and the batched all-patch scoring equals one image at a time."""
from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pytest
import torch
from fake_cuda import FakeTensorDeviceMismatchError, fake_cuda
from PIL import Image
from transformers import ViltForImageAndTextRetrieval, ViltForQuestionAnswering
from vlflow.stages.common.device import cpu_threads_per_rank, stage_device
from vlflow.stages.text.tokenizer import train_bpe, train_wordpiece
from vlflow.stages.unitab.evaluate import caption_images, ground_rows
from vlflow.stages.unitab.evaluate import evaluate as unitab_evaluate
from vlflow.stages.unitab.model import UniTAB, UniTABConfig
from vlflow.stages.vilt.data import QuestionCollator, tokenize
from vlflow.stages.vilt.evaluate import evaluate_retrieval, image_batches, load_scorer, score_all_pairs, text_batches
from vlflow.stages.vilt.evaluate_vqa import answer_questions, evaluate_vqa
from vlflow.stages.vilt.model import ViltPretrainingModel, build_config
from vlflow.stages.vilt.spec import ViltEvaluateRetrievalParams, ViltEvaluateVqaParams, ViltPretrainParams

from vlflow.stage import LaunchSpec, StageContext

torch.set_num_threads(1)

CAPTIONS = ["a red circle at the top left", "a blue square to the right of a green triangle",
            "the yellow triangle in the center", "an orange circle below a purple square"]
IMAGES = [torch.randn(3, 64, 48), torch.randn(3, 48, 64), torch.randn(3, 64, 64)]


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(iter(CAPTIONS * 5), vocab_size=60, lowercase=True, min_frequency=1)


@pytest.fixture(scope="module")
def vilt_config(wordpiece):
    params = ViltPretrainParams(hidden_size=32, num_layers=1, num_heads=2, patch_size=16, image_size=64,
                                max_image_size=64, max_text_len=16, max_image_len=8, mlp_ratio=2)
    return build_config(params, len(wordpiece), wordpiece.pad_token_id)


def test_fake_cuda_catches_a_cpu_tensor_meeting_a_cuda_one():
    linear = torch.nn.Linear(4, 2)
    with fake_cuda():
        device = stage_device()
        assert device == torch.device("cuda", 0)
        linear.to(device)
        assert linear(torch.randn(3, 4, device=device)).device == device
        with pytest.raises(FakeTensorDeviceMismatchError):
            linear(torch.randn(3, 4))  # a CPU input into CUDA weights
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.nn.functional.cross_entropy(torch.randn(3, 2, device=device), torch.zeros(3, dtype=torch.long))
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.arange(4)[torch.ones(4, dtype=torch.bool, device=device)]  # CPU tensor, CUDA mask
        host = torch.arange(5)
        assert host.sum().item() == 10  # host work keeps its values


@pytest.mark.parametrize("head", ["itm", "rank"])
def test_retrieval_scoring_runs_on_the_stage_device(tmp_path, wordpiece, vilt_config, head):
    torch.manual_seed(0)
    if head == "itm":
        ViltPretrainingModel(vilt_config).save(tmp_path)
    else:
        config = vilt_config.__class__.from_dict({**vilt_config.to_dict(),
                                                   "architectures": ["ViltForImageAndTextRetrieval"]})
        ViltForImageAndTextRetrieval(config).save_pretrained(tmp_path)
    texts = tokenize(wordpiece, CAPTIONS, 16)
    with fake_cuda():
        device = stage_device()
        vilt, score_head, name = load_scorer(tmp_path, device)
        assert name == head and vilt.embeddings.cls_token.device == device
        batches = image_batches(lambda i: IMAGES[i], [0, 1, 2], 2, vilt.config.patch_size)
        scores = score_all_pairs(vilt, score_head, batches, text_batches(texts, 3, device), 3, device, "bf16")
    assert scores.shape == (len(CAPTIONS), 3) and scores.device.type == "cpu"


def test_vqa_answering_runs_on_the_stage_device(wordpiece, vilt_config):
    torch.manual_seed(0)
    config = vilt_config.__class__.from_dict({**vilt_config.to_dict(), "architectures": ["ViltForQuestionAnswering"],
                                              "id2label": {0: "yes", 1: "no", 2: "red"}})
    vqa = ViltForQuestionAnswering(config).eval()
    collate = QuestionCollator(wordpiece, 16, 3)
    samples = [{"pixel_values": image, "text": text, "answer_labels": [i % 3], "answer_scores": [1.0],
                "question_id": i, "image_index": i} for i, (image, text) in enumerate(zip(IMAGES, CAPTIONS))]
    with fake_cuda():
        device = stage_device()
        vqa.to(device)
        results = answer_questions(vqa, [collate(samples[:2]), collate(samples[2:])], device, "bf16")
    assert [r["question_id"] for r in results] == [0, 1, 2]
    assert [r["targets"] for r in results] == [{0: 1.0}, {1: 1.0}, {2: 1.0}]  # host side: real values


class GroundingRows:
    """A split in unitab.evaluate's interface (caption, phrases, image, image_id per row)."""

    def __init__(self):
        self.rows = [("a red circle next to a blue square",
                      [{"text": "a red circle", "start": 0, "end": 12, "boxes": [[0.1, 0.1, 0.5, 0.5]]},
                       {"text": "a blue square", "start": 21, "end": 34, "boxes": [[0.5, 0.5, 0.9, 0.9]]}]),
                     ("two green triangles", [{"text": "two green triangles", "start": 0, "end": 19,
                                               "boxes": [[0.0, 0.0, 1.0, 1.0]]}])]

    def caption(self, i):
        return self.rows[i][0]

    def phrases(self, i):
        return self.rows[i][1]

    def image(self, i):
        return Image.new("RGB", (64 + 16 * i, 64), (200, 40 * i, 40))

    def image_id(self, i):
        return f"img{i}"


def _unitab_config(tokenizer) -> UniTABConfig:
    return UniTABConfig(text_vocab=len(tokenizer), backbone="resnet10t", d_model=32, enc_layers=1, dec_layers=1,
                        nheads=2, dim_feedforward=64, dropout=0.0, num_queries=20, max_decoding_step=40,
                        text_encoder_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)


def test_unitab_grounding_and_captioning_run_on_the_stage_device():
    tokenizer = train_bpe(iter(CAPTIONS * 5 + ["two green triangles next to a blue square"] * 5), vocab_size=300,
                          lowercase=True, min_frequency=1)
    torch.manual_seed(0)
    model = UniTAB(_unitab_config(tokenizer)).eval()
    source = GroundingRows()
    with fake_cuda():
        device = stage_device()
        model.to(device)
        grounded = ground_rows(model, tokenizer, source, [0, 1], 2, 64, 96, device, "bf16")
        captions = caption_images(model, tokenizer, source, [(0, 0), (1, 1)], 2, 64, 96, 6, device, "bf16")
    assert [(g["row"], g["phrase"]) for g in grounded] == [(0, "a red circle"), (0, "a blue square"),
                                                          (1, "two green triangles")]
    assert all(len(g["box"]) == 4 for g in grounded) and [p for p, _ in captions] == [0, 1]


def test_batched_all_patch_scoring_equals_one_image_at_a_time(wordpiece, vilt_config):
    """Scores depend on the image and the text only: batch sizes and padding change nothing (fp32, CPU)."""
    torch.manual_seed(0)
    model = ViltPretrainingModel(vilt_config).eval()
    texts = tokenize(wordpiece, CAPTIONS, 16)
    head = lambda pooled: model.itm_score(pooled)[:, 1]  # noqa: E731
    cpu = torch.device("cpu")

    def scores(image_batch_size, text_batch_size):
        batches = image_batches(lambda i: IMAGES[i], [0, 1, 2], image_batch_size, vilt_config.patch_size)
        return score_all_pairs(model.vilt, head, batches, text_batches(texts, text_batch_size, cpu), 3, cpu)

    one = scores(1, 1)
    assert one.std() > 0
    torch.testing.assert_close(scores(3, 4), one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores(2, 3), one, rtol=1e-5, atol=1e-6)


def test_cpu_threads_are_shared_among_the_ranks_of_a_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads_per_rank(local_world_size=2, cores=16) == 8
    assert cpu_threads_per_rank(local_world_size=4, cores=2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_rank(local_world_size=2, cores=16) == 3


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation stages on the fake GPU: loading, host batches, the forward path, gathering and writing.

def _png(colour, size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_arrow(path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)


def _vilt_run(directory, model, tokenizer):
    """A ViLT training stage's output layout: model/, tokenizer/, params.json."""
    (model.save if isinstance(model, ViltPretrainingModel) else model.save_pretrained)(directory / "model")
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    (directory / "params.json").write_text(json.dumps({"image_size": 64, "max_image_size": 64, "max_text_len": 16}))
    return directory


def _context(tmp_path, params, inputs, precision="bf16"):
    out = tmp_path / "out"
    out.mkdir()
    return StageContext(stage="evaluate", params=params, inputs=inputs, output_dir=out,
                        launch=LaunchSpec(precision=precision), log=logging.getLogger("test"))


COLOURS = [(215, 40, 40), (45, 85, 215), (235, 205, 35)]


def test_vilt_evaluate_retrieval_stage_runs_on_the_fake_gpu(tmp_path, wordpiece, vilt_config):
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    _write_arrow(arrows / "coco_caption_karpathy_test.arrow",
                 [{"image": _png(c, (64 + 16 * i, 64)), "caption": CAPTIONS[i:i + 2], "image_id": f"{i}.jpg",
                   "split": "test"} for i, c in enumerate(COLOURS)])
    torch.manual_seed(0)
    run = _vilt_run(tmp_path / "run", ViltPretrainingModel(vilt_config), wordpiece)
    params = ViltEvaluateRetrievalParams(split="test", subsets=["all"], text_batch_size=4, image_batch_size=2)
    ctx = _context(tmp_path, params, {"arrows": arrows, "model": run})
    with fake_cuda():
        metrics = evaluate_retrieval(ctx)
    assert (metrics["device"], metrics["precision"], metrics["num_texts"]) == ("cuda", "bf16", 6)
    scores = torch.load(ctx.output_dir / "scores.pt", weights_only=True)["scores"]
    assert scores.shape == (6, 3)


def test_vilt_evaluate_vqa_stage_runs_on_the_fake_gpu(tmp_path, wordpiece, vilt_config):
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    _write_arrow(arrows / "vqav2_rest_val.arrow",
                 [{"image": _png(c, (64, 64 + 16 * i)), "questions": [CAPTIONS[i], CAPTIONS[i + 1]],
                   "answer_labels": [[0], [1, 2]], "answer_scores": [[1.0], [0.6, 0.3]], "image_id": i,
                   "question_id": [10 * i, 10 * i + 1]} for i, c in enumerate(COLOURS)])
    config = vilt_config.__class__.from_dict({**vilt_config.to_dict(), "architectures": ["ViltForQuestionAnswering"],
                                              "id2label": {0: "yes", 1: "no", 2: "red"}})
    torch.manual_seed(0)
    run = _vilt_run(tmp_path / "run", ViltForQuestionAnswering(config), wordpiece)
    ctx = _context(tmp_path, ViltEvaluateVqaParams(split="rest_val", batch_size=4), {"arrows": arrows, "model": run})
    with fake_cuda():
        metrics = evaluate_vqa(ctx)
    assert (metrics["device"], metrics["precision"], metrics["questions"]) == ("cuda", "bf16", 6)
    assert len(json.loads((ctx.output_dir / "predictions.json").read_text())) == 6


def test_unitab_evaluate_stage_runs_on_the_fake_gpu(tmp_path):
    from vlflow.stages.unitab.spec import EvaluateParams, PretrainParams
    from vlflow.stages.unitab.train import save_outputs

    source = GroundingRows()
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    _write_arrow(arrows / "f30k_grounding_test.arrow",
                 [{"image": _png((200, 40 * i, 40), (64 + 16 * i, 64)), "image_id": f"{i}.jpg",
                   "caption": source.caption(i), "phrases": source.phrases(i), "width": 64 + 16 * i, "height": 64,
                   "split": "test"} for i in range(2)])
    tokenizer = train_bpe(iter(CAPTIONS * 5 + ["two green triangles next to a blue square"] * 5), vocab_size=300,
                          lowercase=True, min_frequency=1)
    torch.manual_seed(0)
    config = _unitab_config(tokenizer)
    save_outputs(tmp_path / "run", UniTAB(config), None, config, tokenizer,
                 PretrainParams(image_size=64, max_image_size=96, backbone_norm="batch_norm",
                                freeze_backbone_stem=False))
    params = EvaluateParams(split="test", batch_size=2, max_decoding_step=8)
    ctx = _context(tmp_path, params, {"arrows": arrows, "model": tmp_path / "run"})
    with fake_cuda():
        metrics = unitab_evaluate(ctx)
    assert (metrics["device"], metrics["precision"], metrics["phrases"], metrics["images"]) == ("cuda", "bf16", 3, 2)
