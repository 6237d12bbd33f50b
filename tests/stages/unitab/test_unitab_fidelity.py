"""UniTAB fidelity (issue 14): backbone as UniTAB/MDETR, DETR-style positions, mergedGT targets, augmentation,
schedule, no_detection, and the metrics against the reference implementations (pycocoevalcap, pycocotools)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from pydantic import ValidationError
from vlflow.stages.unitab.model import Backbone
from vlflow.stages.unitab.spec import PretrainParams

from tests.conftest import REPO_ROOT

torch.set_num_threads(1)


# -- 1. backbone -------------------------------------------------------------------------------------------------

def test_frozen_bn_without_weights_is_refused():
    with pytest.raises(ValidationError, match="frozen_bn needs backbone_weights"):
        PretrainParams()
    with pytest.raises(ValidationError, match="freeze_backbone_stem needs backbone_weights"):
        PretrainParams(backbone_norm="batch_norm")
    scratch = PretrainParams(backbone_norm="batch_norm", freeze_backbone_stem=False)  # the tiny workflow's choice
    assert scratch.backbone_weights is None
    assert PretrainParams(backbone_weights="/data/r101.pth").backbone_norm == "frozen_bn"


def _torchvision_resnet18(tmp_path, mdetr: bool):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BN statistics, so a frozen-BN forward depends on them
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = reference.state_dict()
    if mdetr:  # MDETR/UniTAB checkpoint layout: {"model": {"backbone.0.body.<name>": ...}, ...}
        state = {"model": {f"backbone.0.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
                 | {"transformer.x": torch.zeros(1)}, "epoch": 3}
    path = tmp_path / ("mdetr.pth" if mdetr else "resnet18.pth")
    torch.save(state, path)
    return reference.eval(), path


@pytest.mark.parametrize("mdetr", [False, True], ids=["torchvision", "mdetr"])
def test_backbone_loads_local_weights_and_matches_torchvision(tmp_path, mdetr):
    reference, path = _torchvision_resnet18(tmp_path, mdetr)
    backbone = Backbone("resnet18", weights=str(path), norm="frozen_bn").eval()
    images = torch.randn(2, 3, 64, 64)
    body = torch.nn.Sequential(*list(reference.children())[:-2])  # torchvision trunk up to layer4
    torch.testing.assert_close(backbone(images), body(images), rtol=1e-4, atol=1e-4)
    backbone.freeze_stem_and_layer1()
    trainable = {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # MDETR's rule; BN affine are frozen buffers anyway
    assert not any(name.startswith("bn") or ".bn" in name for name, _ in backbone.body.named_parameters())


def test_backbone_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"other.pth: \d+ of \d+ tensors .* missing"):
        Backbone("resnet18", weights=str(path))
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="80 of 216 tensors"):
        Backbone("resnet34", weights=str(path))  # the same names, but resnet34 has more blocks
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"conv1.weight has shape \(64, 3, 3, 3\)"):
        Backbone("resnet18", weights=str(path))


# -- 2. positions inside every attention layer (DETR/UniTAB) -----------------------------------------------------

def test_positions_are_added_to_queries_and_keys_in_every_layer():
    from vlflow.stages.unitab.model import UniTAB, UniTABConfig

    torch.manual_seed(0)
    config = UniTABConfig(text_vocab=50, backbone="resnet10t", backbone_norm="batch_norm", d_model=32, enc_layers=2,
                          dec_layers=2, nheads=2, dim_feedforward=64, dropout=0.0, num_queries=8,
                          max_decoding_step=16, text_encoder_config=dict(vocab_size=50, hidden_size=32,
                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=40))
    model = UniTAB(config).eval()
    seen: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for name, module in model.transformer.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, *args[:3])))
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    text, text_mask = torch.randint(3, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    memory = model.encode(images, mask, text, text_mask)
    tokens = torch.randint(3, config.layout.size, (2, 6))
    model.decode(memory, tokens)
    query_pos = model.decoder_pos(torch.arange(6))[None]
    image_cells = memory.pos.shape[1] - 5
    assert memory.pos[:, :image_cells].abs().sum() > 0 and memory.pos[:, image_cells:].abs().sum() == 0  # text: 0
    names = [name for name, *_ in seen]
    assert names == ["encoder_layers.0.self_attn", "encoder_layers.1.self_attn",
                     "decoder_layers.0.self_attn", "decoder_layers.0.cross_attn",
                     "decoder_layers.1.self_attn", "decoder_layers.1.cross_attn"]
    for name, query, key, value in seen:
        if name.startswith("encoder"):  # q = k = x + pos, v = x
            torch.testing.assert_close(query, value + memory.pos)
            torch.testing.assert_close(key, value + memory.pos)
        elif name.endswith("self_attn"):
            torch.testing.assert_close(query, value + query_pos)
            torch.testing.assert_close(key, value + query_pos)
        else:  # cross-attention: k = memory + pos, v = memory
            torch.testing.assert_close(value, memory.memory)
            torch.testing.assert_close(key, memory.memory + memory.pos)


# -- 3. mergedGT targets and MDETR's augmentation -----------------------------------------------------------------

def test_merged_targets_put_one_enclosing_box_per_phrase():
    from vlflow.stages.unitab.data import PhraseSpan, build_sequence, merge_boxes
    from vlflow.stages.unitab.model import TokenLayout

    boxes = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.9, 0.3]]
    assert merge_boxes(boxes) == [[0.1, 0.1, 0.9, 0.4]]  # MDETR flickr_eval._merge_boxes
    assert merge_boxes(boxes[:1]) == boxes[:1]
    layout = TokenLayout(text_vocab=10, num_bins=11)
    span = PhraseSpan(0, 0, 1, merge_boxes(boxes))
    sequence = build_sequence([5, 6], [span], layout, bos=0, eos=2)
    assert sequence == [0, layout.obj_start, 5, *layout.box_to_tokens([0.1, 0.1, 0.9, 0.4]), layout.obj_end, 6, 2]
    defaults = PretrainParams(backbone_weights="/r101.pth")
    assert (defaults.box_targets, defaults.augment) == ("merged", "mdetr")  # the paper's, unless a workflow says


def _picture_with_box(width=200, height=150, box=(60, 40, 120, 100)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    return image, [box[0] / width, box[1] / height, box[2] / width, box[3] / height]


def test_mdetr_augmentation_moves_boxes_with_the_pixels():
    import random

    from vlflow.stages.unitab.data import IMAGENET_MEAN, IMAGENET_STD, MDETR_SCALES, mdetr_augment

    image, box = _picture_with_box()
    white = float((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0])
    shorter_sides, crops = set(), 0
    for seed in range(40):
        pixels, ((moved,),) = mdetr_augment(image, [[box]], 800, 1333, random.Random(seed))
        again, _ = mdetr_augment(image, [[box]], 800, 1333, random.Random(seed))
        assert torch.equal(pixels, again)  # a function of the rng alone (resumable)
        height, width = pixels.shape[1:]
        shorter_sides.add(min(height, width))
        crops += abs(width / height - 200 / 150) > 0.02
        x1, y1, x2, y2 = moved[0] * width, moved[1] * height, moved[2] * width, moved[3] * height
        inside = pixels[0, int(y1) + 3:int(y2) - 3, int(x1) + 3:int(x2) - 3]
        assert inside.numel() and inside.min() > white - 0.3, (seed, moved)  # the box still covers the white square
        if x1 > 4:
            assert pixels[0, int((y1 + y2) / 2), int(x1) - 4] < 0  # and is tight on the left: black there
    assert shorter_sides <= set(MDETR_SCALES) and len(shorter_sides) > 3
    assert crops > 0  # the resize + crop branch ran


# -- 4. schedule --------------------------------------------------------------------------------------------------

def _unitab_adjust_learning_rate(epoch, curr_step, num_training_steps, lr, lr_backbone, text_encoder_lr,
                                 fraction_warmup_steps=0.01, lr_drop=15):
    """microsoft/UniTAB util/optim.py adjust_learning_rate, schedule linear_with_warmup, transcribed."""
    num_warmup_steps = round(fraction_warmup_steps * num_training_steps)
    gamma = 0.1 ** (epoch // lr_drop)
    if curr_step < num_warmup_steps:
        text_encoder_gamma = float(curr_step) / float(max(1, num_warmup_steps))
    else:
        text_encoder_gamma = max(0.0, float(num_training_steps - curr_step)
                                 / float(max(1, num_training_steps - num_warmup_steps)))
    return [lr * gamma, lr_backbone * gamma, text_encoder_lr * text_encoder_gamma]


def test_schedule_is_unitabs_per_group():
    from vlflow.stages.unitab.train import unitab_schedule

    params = PretrainParams(backbone_weights="/r101.pth")  # defaults: the paper's (20 epochs, drop at 15, 1 %)
    assert (params.epochs, params.lr_drop, params.warmup, params.lr_schedule) == (20, 15, 0.01, "linear_with_warmup")
    batches_per_epoch = 50
    total = params.epochs * batches_per_epoch
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "name": name}
              for lr, name in ((1e-4, "transformer"), (2e-5, "backbone"), (2e-5, "text_encoder"))]
    optimizer = torch.optim.AdamW(groups)
    scheduler = unitab_schedule(optimizer, params, total, batches_per_epoch, accumulation=1)
    for step in range(total):
        expected = _unitab_adjust_learning_rate(step // batches_per_epoch, step, total, 1e-4, 2e-5, 2e-5)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected, rel=1e-12, abs=1e-20), step
        optimizer.step()
        scheduler.step()
    # the shape, in words: constant then x0.1 at epoch 15; the text encoder from 0 up over 10 steps, then to 0
    lrs = []
    optimizer = torch.optim.AdamW(groups)
    scheduler = unitab_schedule(optimizer, params, total, batches_per_epoch, accumulation=1)
    for _ in range(total):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[0][2] == 0 and lrs[10][2] == pytest.approx(2e-5) and lrs[-1][2] < 2e-5 / 900
    assert lrs[749][0] == pytest.approx(1e-4) and lrs[750][0] == pytest.approx(1e-5) == lrs[-1][0]
    # with accumulation, epochs count micro-batches: 2 per step -> the drop comes at step 375
    optimizer = torch.optim.AdamW(groups)
    scheduler = unitab_schedule(optimizer, params, total // 2, batches_per_epoch, accumulation=2)
    for _ in range(375):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    state = scheduler.state_dict()  # resumable: the factors are objects whose settings are checkpointed
    assert state["last_epoch"] == 375 and state["lr_lambdas"][2]["group"] == "text_encoder"


# -- 5. no_detection switches the evaluator only -----------------------------------------------------------------

CAPTIONS = ["a red circle next to a blue square", "two green triangles on a white background"] * 8
ROWS = [("a red circle next to a blue square",
         [{"text": "a red circle", "start": 0, "end": 12, "boxes": [[0.1, 0.1, 0.5, 0.5]]},
          {"text": "a blue square", "start": 21, "end": 34, "boxes": [[0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.2, 0.9]]}]),
        ("two green triangles on a white background",
         [{"text": "two green triangles", "start": 0, "end": 19, "boxes": [[0.0, 0.0, 1.0, 1.0]]}])]


@pytest.fixture(scope="module")
def bpe():
    from vlflow.stages.text.tokenizer import train_bpe

    return train_bpe(iter(CAPTIONS), vocab_size=300, lowercase=True, min_frequency=1)


def _small_model(tokenizer):
    from vlflow.stages.unitab.model import UniTAB, UniTABConfig

    torch.manual_seed(0)
    return UniTAB(UniTABConfig(
        text_vocab=len(tokenizer), backbone="resnet10t", backbone_norm="batch_norm", d_model=32, enc_layers=1,
        dec_layers=1, nheads=2, dim_feedforward=64, dropout=0.0, num_queries=20, max_decoding_step=40,
        text_encoder_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64,
                                 pad_token_id=tokenizer.pad_token_id),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def _evaluate(tmp_path, tokenizer, train_overrides: dict, **evaluate_params) -> dict:
    import io
    import json
    import logging

    import pyarrow as pa
    from PIL import Image
    from vlflow.stages.data.arrow_grounding import GROUNDING_SCHEMA
    from vlflow.stages.unitab.evaluate import evaluate
    from vlflow.stages.unitab.spec import EvaluateParams
    from vlflow.stages.unitab.train import save_outputs

    from vlflow.stage import StageContext

    arrows = tmp_path / "arrows"
    arrows.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (caption, phrases) in enumerate(ROWS):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 40 * i, 40)).save(buffer, format="PNG")
        rows.append({"image": buffer.getvalue(), "image_id": f"{i}.jpg", "caption": caption, "phrases": phrases,
                     "width": 64, "height": 48, "split": "test"})
    table = pa.Table.from_pylist(rows, schema=GROUNDING_SCHEMA)
    with pa.ipc.new_file(str(arrows / "f30k_grounding_test.arrow"), table.schema) as writer:
        writer.write_table(table)
    model = _small_model(tokenizer)
    run = tmp_path / "run"
    save_outputs(run, model, None, model.config, tokenizer, PretrainParams(
        image_size=48, max_image_size=64, backbone_norm="batch_norm", freeze_backbone_stem=False, **train_overrides))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    ctx = StageContext(stage="evaluate", params=EvaluateParams(split="test", batch_size=2, max_decoding_step=12,
                                                               **evaluate_params),
                       inputs={"arrows": arrows, "model": run}, output_dir=out, log=logging.getLogger("test"))
    evaluate(ctx)
    return json.loads((out / "metrics.json").read_text())


def test_no_detection_keeps_box_targets_and_switches_the_evaluator(tmp_path, bpe):
    from vlflow.stages.unitab.data import GroundingSequenceDataset
    from vlflow.stages.unitab.model import TokenLayout

    class Source:
        def __len__(self):
            return len(ROWS)

        def caption(self, i):
            return ROWS[i][0]

        def phrases(self, i):
            return ROWS[i][1]

        def image(self, i):
            from PIL import Image
            return Image.new("RGB", (64, 48))

    layout = TokenLayout(len(bpe), 20)
    params = PretrainParams(backbone_weights="/r101.pth", do_caption=True, no_detection=True)  # the seed's flags
    dataset = GroundingSequenceDataset(Source(), bpe, layout, image_size=32, max_image_size=48, max_decoding_step=40,
                                       seqcrop=params.pretrain_seqcrop, do_caption=params.do_caption,
                                       box_targets=params.box_targets, augment="none")
    targets = dataset[0]["targets"]
    assert targets.count(layout.obj_start) == 2 and sum(layout.is_bin(t) for t in targets) == 8  # merged: 1 box each

    with_boxes = _evaluate(tmp_path / "a", bpe, {})
    assert with_boxes["no_detection"] is False and with_boxes["phrases"] == 3
    assert 0 <= with_boxes["merged_recall@1"] <= 1 and "anybox_oracle_recall@1" in with_boxes and "bleu4" in with_boxes
    skipped = _evaluate(tmp_path / "b", bpe, {"no_detection": True})  # the model's flag switches the evaluator
    assert skipped["no_detection"] is True and "bleu4" in skipped
    assert not any("recall" in key for key in skipped)
    forced = _evaluate(tmp_path / "c", bpe, {"no_detection": True}, no_detection=False)
    assert forced["phrases"] == 3


# -- 6. metrics: the paper's MERGED protocol, and agreement with the reference implementations ---------------------

def test_free_decoding_links_boxes_to_caption_tokens_as_unitab():
    from vlflow.stages.unitab.data import PhraseSpan
    from vlflow.stages.unitab.evaluate import boxes_by_caption_token, free_decoding_top1
    from vlflow.stages.unitab.model import TokenLayout

    layout = TokenLayout(text_vocab=10, num_bins=11)
    box_a, box_b = [0.0, 0.1, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]
    # "5 <obj> 6 7 [box a] </obj> 8 <obj> 9 [box b] </obj> </s>"  (text tokens 5,6,7,8,9 = caption tokens 0..4)
    tokens = [5, layout.obj_start, 6, 7, *layout.box_to_tokens(box_a), layout.obj_end, 8,
              layout.obj_start, 9, *layout.box_to_tokens(box_b), layout.obj_end, 2, 4, 4]
    box_of_token, boxes = boxes_by_caption_token(tokens, layout, eos_token_id=2)
    assert box_of_token == [-1, 0, 0, -1, 1]
    assert boxes == [layout.tokens_to_box(layout.box_to_tokens(b)) for b in (box_a, box_b)]
    spans = [PhraseSpan(0, 1, 3, []), PhraseSpan(1, 4, 5, []), PhraseSpan(2, 0, 1, []), PhraseSpan(3, 3, 5, [])]
    top1 = free_decoding_top1(tokens, spans, layout, eos_token_id=2)
    assert top1 == [boxes[0], boxes[1], boxes[0], boxes[1]]  # token 0 is linked to no box: the first decoded box
    assert free_decoding_top1([5, 6, 2], spans[:1], layout, eos_token_id=2) == [None]  # nothing decoded: a miss


def test_merged_protocol_is_stricter_than_any_box():
    from vlflow.stages.unitab import metrics

    gold = [[0.0, 0.0, 0.3, 0.3], [0.6, 0.6, 1.0, 1.0]]  # two people far apart
    predicted = [0.0, 0.0, 0.3, 0.3]  # one of them
    assert metrics.recall_at_1([predicted], [gold]) == 1.0  # ANY-BOX
    assert metrics.merged_box(gold) == [0.0, 0.0, 1.0, 1.0]
    assert metrics.recall_at_1([predicted], [[metrics.merged_box(gold)]]) == 0.0  # MERGED: the group's box


def test_bleu4_and_cider_d_agree_with_pycocoevalcap():
    import random

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from vlflow.stages.unitab import metrics

    rng = random.Random(0)
    words = "a the man woman dog red blue ball park runs sits on in with near two small big".split()
    references, candidates = [], []
    for _ in range(30):
        refs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 10))) for _ in range(5)]
        base = refs[0].split()
        candidate = base[:rng.randint(3, len(base))] + [rng.choice(words) for _ in range(rng.randint(0, 3))]
        references.append(refs)
        candidates.append(" ".join(candidate).capitalize() + ".")  # case and punctuation: our tokenizer strips them
    # pycocoevalcap scores already-tokenised text (its PTBTokenizer needs Java): give it our tokens
    gts = {i: [" ".join(metrics.tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(metrics.tokenize(c))] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert metrics.bleu4(candidates, references) == pytest.approx(bleu[3], rel=1e-6)
    assert metrics.cider_d(candidates, references) == pytest.approx(cider, rel=1e-9)
    assert 0.05 < bleu[3] < 0.9 and cider > 0.1  # a case with real matches, not two zeros


def test_box_iou_agrees_with_pycocotools():
    import random

    import numpy as np
    from pycocotools import mask as coco_mask
    from vlflow.stages.unitab import metrics

    rng = random.Random(1)
    boxes = []
    for _ in range(60):
        x1, y1 = rng.random() * 0.8, rng.random() * 0.8
        boxes.append([x1, y1, x1 + rng.random() * (1 - x1), y1 + rng.random() * (1 - y1)])
    xywh = np.array([[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in boxes], dtype=np.float64)
    reference = coco_mask.iou(xywh, xywh[::-1].copy(), [0] * len(boxes))
    ours = np.array([[metrics.box_iou(a, b) for b in boxes[::-1]] for a in boxes])
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    assert (reference > 0.5).sum() > len(boxes)  # overlaps on both sides of the 0.5 threshold


# -- 7. flickr30k_unitab.yaml carries the paper's recipe ------------------------------------------------------------

def test_flickr30k_unitab_workflow_is_the_papers_recipe():

    from vlflow.workflow import load_workflow

    path = REPO_ROOT / "workflows" / "flickr30k_unitab.yaml"
    workflow = load_workflow(path, env={"MDETR_CHECKPOINT": "/weights/pretrained_resnet101_checkpoint.pth"})
    pretrain = workflow.stages["pretrain"]
    paper = {  # microsoft/UniTAB README pre-train command, configs/pretrain.json, main.py defaults
        "backbone": "resnet101", "backbone_norm": "frozen_bn", "freeze_backbone_stem": True,
        "text_encoder": "roberta-base", "d_model": 256, "enc_layers": 6, "dec_layers": 6, "nheads": 8,
        "dim_feedforward": 2048, "dropout": 0.1, "num_queries": 200, "max_decoding_step": 256, "do_caption": True,
        "no_detection": True, "pretrain_seqcrop": "mixed", "box_targets": "merged", "augment": "mdetr",
        "image_size": 800, "max_image_size": 1333, "ema": True, "ema_decay": 0.9998, "grad_clip": 0.1, "lr": 1e-4,
        "lr_backbone": 2e-5, "text_encoder_lr": 2e-5, "weight_decay": 1e-4, "batch_size": 128, "epochs": 20,
        "lr_drop": 15, "lr_schedule": "linear_with_warmup", "warmup": 0.01, "max_steps": None, "seed": 42}
    assert {key: pretrain.params[key] for key in paper} == paper
    assert pretrain.params["init_checkpoint"] == "/weights/pretrained_resnet101_checkpoint.pth"  # --load
    assert pretrain.params["backbone_weights"] is None
    assert pretrain.launch.precision == "fp32"  # UniTAB trains in fp32
    assert workflow.stages["arrows"].params["annotations"] == "separateGT"  # merged at training, both at evaluation
    assert pretrain.inputs["mixed"].stage == "mixed_arrows"  # combine_datasets [flickr, mixed]
    assert workflow.stages["mixed_arrows"].params["annotation_file"] == "mdetr_annotations/final_mixed_train.json"

    finetune = workflow.stages["finetune"]  # README "Flickr30k grounding" command + configs/flickr.json
    grounding = {"start_from_ema": True, "box_targets": "merged", "augment": "mdetr", "image_size": 800,
                 "max_image_size": 1333, "ema": True, "ema_decay": 0.9998, "grad_clip": 0.1, "lr": 1e-4,
                 "lr_backbone": 1e-5, "text_encoder_lr": 5e-5, "weight_decay": 1e-4, "batch_size": 16, "epochs": 20,
                 "lr_drop": 15, "lr_schedule": "linear_with_warmup", "warmup": 0.01, "max_steps": None}
    assert {key: finetune.params[key] for key in grounding} == grounding
    assert finetune.inputs["model"].stage == "pretrain" and finetune.launch.precision == "fp32"
    assert workflow.stages["evaluate"].inputs["model"].stage == "finetune"  # the paper's R@1 is the fine-tuned one


def test_unreadable_backbone_weights_are_one_error_naming_the_file(tmp_path):
    from vlflow.stages.unitab.model import BackboneWeightsError

    missing, garbage = tmp_path / "absent.pth", tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path in (missing, garbage):
        with pytest.raises(BackboneWeightsError, match=f"backbone_weights {path}: cannot read"):
            Backbone("resnet18", weights=str(path))
