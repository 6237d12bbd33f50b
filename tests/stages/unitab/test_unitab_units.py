"""UniTAB unit tests: token layout, sequences, model shapes/decoding, frozen BN, EMA, metrics (in-process, CPU)."""
from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch
from PIL import Image
from vlflow.stages.text.tokenizer import train_bpe
from vlflow.stages.unitab import metrics
from vlflow.stages.unitab.data import (
    GroundingSequenceDataset,
    build_sequence,
    collate,
    encoder_sees_text,
    open_split,
    phrase_token_spans,
)
from vlflow.stages.unitab.model import TokenLayout, UniTAB, UniTABConfig, ema_update, sequence_loss

torch.set_num_threads(1)

CAPTIONS = ["a red circle next to a blue square", "two green triangles on a white background",
            "a small yellow star above a big red circle"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter(CAPTIONS), vocab_size=300, lowercase=True, min_frequency=1)


def tiny_config(tokenizer, **overrides) -> UniTABConfig:
    fields = dict(text_vocab=len(tokenizer), backbone="resnet10t", d_model=32, enc_layers=1, dec_layers=1, nheads=2,
                  dim_feedforward=64, dropout=0.0, num_queries=20, max_decoding_step=40,
                  text_encoder_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64,
                                           max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    fields.update(overrides)
    return UniTABConfig(**fields)


# -- token layout ------------------------------------------------------------------------------------------------

def test_box_bin_round_trip():
    layout = TokenLayout(text_vocab=100, num_bins=200)
    assert (layout.obj_start, layout.obj_end, layout.first_bin, layout.size) == (100, 101, 102, 302)
    assert layout.box_to_tokens([0.0, 0.5, 1.0, 0.25]) == [102, 102 + 99, 102 + 199, 102 + int(0.25 * 199)]
    rng = random.Random(0)
    for _ in range(200):
        box = sorted(rng.random() for _ in range(2)) + sorted(rng.random() for _ in range(2))
        tokens = layout.box_to_tokens(box)
        assert all(layout.is_bin(t) for t in tokens)
        back = layout.tokens_to_box(tokens)
        # decoded to the bin's lower edge: quantisation error below one bin width
        assert all(-1e-9 <= v - b < 1 / 199 + 1e-9 for v, b in zip(box, back))
        assert [layout.first_bin + round(b * 199) for b in back] == tokens
    assert layout.box_to_tokens([-0.1, 1.2, 0.0, 1.0])[:2] == [102, 301]  # clamped


# -- sequences ---------------------------------------------------------------------------------------------------

def test_phrase_spans_and_sequence(tokenizer):
    caption = "a red circle next to a blue square"
    phrases = [  # deliberately out of order; the second box of "a blue square" is kept
        {"text": "a blue square", "start": 21, "end": 34, "boxes": [[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.2, 0.2]]},
        {"text": "a red circle", "start": 0, "end": 12, "boxes": [[0.0, 0.0, 0.4, 0.4]]},
        {"text": "next", "start": 13, "end": 17, "boxes": []},  # no box -> not grounded
    ]
    ids, spans = phrase_token_spans(tokenizer, caption, phrases)
    assert ids == tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert [s.phrase_index for s in spans] == [1, 0]
    for span, text in zip(spans, ["a red circle", "a blue square"]):
        assert tokenizer.decode(ids[span.token_start:span.token_end]).strip() == text

    layout = TokenLayout(len(tokenizer), 20)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    seq = build_sequence(ids, spans, layout, bos, eos)
    s0, s1 = spans
    expected = ([bos, layout.obj_start] + ids[s0.token_start:s0.token_end] + layout.box_to_tokens([0, 0, .4, .4])
                + [layout.obj_end] + ids[s0.token_end:s1.token_start] + [layout.obj_start]
                + ids[s1.token_start:s1.token_end] + layout.box_to_tokens([.5, .5, .9, .9])
                + layout.box_to_tokens([.1, .1, .2, .2]) + [layout.obj_end] + ids[s1.token_end:] + [eos])
    assert seq == expected
    # the text-only sequence (with_boxes=False) is exactly the framed caption
    assert build_sequence(ids, spans, layout, bos, eos, with_boxes=False) == tokenizer(caption)["input_ids"]


def test_overlapping_phrase_is_dropped(tokenizer):
    caption = "a red circle"
    phrases = [{"text": "a red circle", "start": 0, "end": 12, "boxes": [[0, 0, 1, 1]]},
               {"text": "circle", "start": 6, "end": 12, "boxes": [[0, 0, .5, .5]]}]
    _, spans = phrase_token_spans(tokenizer, caption, phrases)
    assert [s.phrase_index for s in spans] == [0]


def test_seqcrop_choices():
    rng = random.Random(0)
    assert all(encoder_sees_text("grounding", False, rng) for _ in range(20))
    assert not any(encoder_sees_text("caption", False, rng) for _ in range(20))
    assert encoder_sees_text("none", False, rng) and not encoder_sees_text("none", True, rng)
    mixed = [encoder_sees_text("mixed", False, rng) for _ in range(400)]
    assert 150 < sum(mixed) < 250


def _png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_grounding_arrow(path, rows):
    """A grounding arrow in the arrow.grounding schema (what GroundingArrowDataset reads)."""
    import pyarrow as pa
    table = pa.Table.from_pylist([{"split": "test", "width": 40, "height": 30, **r} for r in rows])
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return open_split(path, "test")


def test_dataset_sample_and_collate(tokenizer, tmp_path):
    caption = "a red circle next to a blue square"
    rows = [{"image": _png(size=(40, 30)), "image_id": "1.jpg", "caption": caption,
             "phrases": [{"text": "a red circle", "start": 0, "end": 12, "boxes": [[0.0, 0.0, 0.4, 0.4]]}]},
            {"image": _png(size=(30, 40)), "image_id": "2.jpg", "caption": "two green triangles",
             "phrases": []}]
    layout = TokenLayout(len(tokenizer), 20)
    source = write_grounding_arrow(tmp_path / "g.arrow", rows)
    caption_only = GroundingSequenceDataset(source, tokenizer, layout, image_size=32, max_image_size=48,
                                            max_decoding_step=40, seqcrop="caption")
    grounding = GroundingSequenceDataset(source, tokenizer, layout, image_size=32, max_image_size=48,
                                         max_decoding_step=40, seqcrop="grounding")
    a, b = caption_only[0], grounding[0]
    assert a["text_ids"] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert b["text_ids"] == tokenizer(caption)["input_ids"]
    assert a["prev_tokens"] == b["prev_tokens"]
    assert a["prev_tokens"][1:] == a["targets"][:-1]  # teacher forcing: targets are inputs shifted by one
    assert a["image"].shape == (3, 32, round(40 * 32 / 30))
    batch = collate([grounding[0], grounding[1]], tokenizer.pad_token_id)
    assert batch["images"].shape[0] == 2 and batch["image_mask"].shape == batch["images"].shape[:1] + batch[
        "images"].shape[2:]
    assert batch["image_mask"][1].any() and not batch["image_mask"][0, :32, :43].any()
    short = len(grounding[1]["targets"])
    assert (batch["targets"][1, short:] == -100).all() and batch["token_padding"][1, short:].all()
    assert not batch["token_padding"][0].any()


# -- model -------------------------------------------------------------------------------------------------------

def test_forward_shapes_and_causality(tokenizer):
    torch.manual_seed(0)
    model = UniTAB(tiny_config(tokenizer)).eval()
    images, image_mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    text = torch.tensor([[0, 5, 6, 2], [0, 2, 1, 1]])
    text_mask = (text != 1).long()
    prev = torch.randint(0, model.layout.size, (2, 12))
    logits = model(images, image_mask, text, text_mask, prev)
    assert logits.shape == (2, 12, model.layout.size)
    # causal: changing a later input token leaves earlier logits unchanged
    changed = prev.clone()
    changed[:, 8] = (changed[:, 8] + 1) % model.layout.size
    logits2 = model(images, image_mask, text, text_mask, changed)
    torch.testing.assert_close(logits[:, :8], logits2[:, :8])
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:])
    assert model.output.weight is model.token_embed.weight  # tied
    loss = sequence_loss(logits, torch.full((2, 12), -100).index_fill_(1, torch.tensor([0, 3]), 7))
    assert math.isfinite(loss.item())


def test_greedy_decoding_stops_at_max_steps(tokenizer):
    torch.manual_seed(0)
    # eos unreachable: generation must stop at the step cap
    model = UniTAB(tiny_config(tokenizer, eos_token_id=10 ** 6)).eval()
    memory = model.encode(torch.randn(3, 3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.bool),
                                   torch.tensor([[0, 2]] * 3), torch.ones(3, 2, dtype=torch.long))
    tokens = model.generate(memory, max_steps=9)
    assert tokens.shape == (3, 9) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    # and the model's own cap bounds any request
    assert model.generate(memory, max_steps=10 ** 4).shape == (3, 40)


def test_frozen_batchnorm_is_frozen(tokenizer):
    model = UniTAB(tiny_config(tokenizer))
    bn_types = {type(m).__name__ for m in model.backbone.modules() if "BatchNorm" in type(m).__name__}
    assert bn_types == {"FrozenBatchNorm2d"}
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "bn" in k}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model.backbone(torch.randn(2, 3, 64, 64) * 3 + 1).square().mean()
    loss.backward()
    optimizer.step()
    after = model.backbone.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if "bn" in n)
    # from-scratch option: GroupNorm, no BatchNorm left (SyncBatchNorm conversion under torch_ddp needs GPUs)
    scratch = UniTAB(tiny_config(tokenizer, backbone_norm="group_norm"))
    assert not any("BatchNorm" in type(m).__name__ for m in scratch.backbone.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in scratch.backbone.modules())


def test_ema_update_math():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = copy.deepcopy(model)
    start = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema_update(ema, model, decay=0.9)
    for s, e, m in zip(start, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * m)
    assert torch.equal(ema[1].running_mean, torch.full((2,), 5.0))


# -- metrics -----------------------------------------------------------------------------------------------------

def test_iou_and_recall_hand_made():
    assert metrics.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert metrics.box_iou([0, 0, 0.5, 1], [0.25, 0, 0.75, 1]) == pytest.approx(0.25 / 0.75)
    assert metrics.box_iou([0, 0, 0.1, 0.1], [0.5, 0.5, 1, 1]) == 0.0
    predictions = [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    gold = [[[0, 0, 0.5, 0.6]],  # IoU 0.833 -> hit
            [[0.5, 0.5, 1, 1], [0.1, 0.1, 0.5, 0.5]],  # second gold box IoU 0.64 -> hit
            [[0.5, 0.5, 0.8, 0.8]]]  # IoU 0.36 -> miss
    assert metrics.recall_at_1(predictions, gold) == pytest.approx(2 / 3)


def test_bleu4_hand_computed():
    # identical -> 1; no 4-gram overlap -> 0
    assert metrics.bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    assert metrics.bleu4(["the cat sat on a hat"], [["a dog lay under the mat"]]) == 0.0
    # candidate "the cat sat on the hat" vs ref "the cat sat on the mat": p1 5/6 p2 4/5 p3 3/4 p4 2/3, no BP
    expected = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert metrics.bleu4(["The cat sat on the hat."], [["the cat sat on the mat"]]) == pytest.approx(expected)
    # shorter candidate: closest reference length 6 of (6, 9), c = 5 -> BP = exp(1 - 6/5); all precisions 1
    assert metrics.bleu4(["the cat sat on the"], [["the cat sat on the mat", "the cat sat on the mat all day"]]) \
        == pytest.approx(math.exp(1 - 6 / 5))
    # clipping: "the the the the" vs "the cat": p1 = 1/4 but p2..p4 = 0 -> 0
    assert metrics.bleu4(["the the the the"], [["the cat"]]) == 0.0


def test_cider_d_hand_computed():
    # two images, one reference each. idf = log(2) - log(df): words unique to one image get log 2, shared get 0.
    refs = [["a cat"], ["a dog"]]
    # image 1: candidate == reference; only "cat" (unigram) and "a cat" (bigram) have idf > 0 -> cosine 1 for n=1,2,
    # n=3,4 have no n-grams (0). Length diff 0. score = (1 + 1 + 0 + 0) / 4 * 10 = 5.
    # image 2: candidate "a cat" vs ref "a dog": no shared weighted n-gram -> 0.
    assert metrics.cider_d(["a cat", "a cat"], refs) == pytest.approx((5.0 + 0.0) / 2)
    # length penalty: candidate "a cat cat" vs "a cat": unigram vecs c={cat: 2 log2}, r={cat: log2} ->
    # min(2l, l) * l / (2l * l) = 0.5; bigram c={a cat: l, cat cat: l} r={a cat: l} -> l*l / (sqrt2 l * l) = 1/sqrt2
    # penalty exp(-1/72)
    expected = (0.5 + 1 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72)
    assert metrics.cider_d(["a cat cat", "a dog"], refs) == pytest.approx((expected + 5.0) / 2)


def test_grounding_decodes_one_box_per_phrase_from_bins(tokenizer):
    from vlflow.stages.unitab.evaluate import caption_text, ground_phrases

    torch.manual_seed(0)
    model = UniTAB(tiny_config(tokenizer)).eval()
    captions = [("a red circle next to a blue square",
                 [{"text": "a red circle", "start": 0, "end": 12, "boxes": [[0, 0, .5, .5]]},
                  {"text": "a blue square", "start": 21, "end": 34, "boxes": [[.5, .5, 1, 1]]}]),
                ("two green triangles", [{"text": "two green triangles", "start": 0, "end": 19,
                                          "boxes": [[.1, .1, .3, .3]]}])]
    parsed = [phrase_token_spans(tokenizer, c, p) for c, p in captions]
    memory = model.encode(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool),
                                   torch.tensor([[0, 2], [0, 2]]), torch.ones(2, 2, dtype=torch.long))
    boxes = ground_phrases(model, memory, [ids for ids, _ in parsed], [s for _, s in parsed])
    assert [len(b) for b in boxes] == [2, 1]
    grid = {i / 19 for i in range(20)}  # decoded values are bin lower edges
    assert all(min(abs(v - g) for g in grid) < 1e-9 for row in boxes for box in row for v in box)
    # captions: box/obj tokens are dropped and decoding stops at </s>
    layout = model.layout
    ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    tokens = [tokenizer.bos_token_id, layout.obj_start, *ids, *layout.box_to_tokens([0, 0, 1, 1]), layout.obj_end,
              tokenizer.eos_token_id, ids[0]]
    assert caption_text(tokens, tokenizer, layout.text_vocab) == "a red circle"
