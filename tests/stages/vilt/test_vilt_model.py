"""ViLT model, batches and metrics, in-process (no launcher): shapes, masking, ITM negatives (in the batch and from
the dataset), saved layout, ViT initialisation, the VQA head and exact recall@k."""
import io

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViltForImageAndTextRetrieval, ViltForMaskedLM, ViltForQuestionAnswering
from vlflow.stages.data.transforms import normalize_pixels
from vlflow.stages.text.tokenizer import train_wordpiece
from vlflow.stages.vilt.data import (
    CaptionPairs,
    MlmMasker,
    PairCollator,
    QuestionCollator,
    image_dataset,
    swap_images_for_itm,
)
from vlflow.stages.vilt.evaluate import recall_at_k, subset_recall, subsets_for
from vlflow.stages.vilt.model import (
    ITM_HEAD_FILE,
    ViltPretrainingModel,
    ViltRetrievalTrainingModel,
    ViltVqaTrainingModel,
    build_config,
    embed_images,
    encode,
    load_vit_weights,
    retrieval_model_from_pretraining,
    vqa_model_from_pretraining,
)
from vlflow.stages.vilt.spec import ViltPretrainParams
from vlflow.stages.vilt.train import decay_groups, pretrain_task

torch.set_num_threads(1)

CAPTIONS = [
    ["a red circle at the top left", "one red circle"],
    ["a blue square to the right of a green triangle", "blue square and green triangle"],
    ["a yellow triangle in the center", "the yellow triangle"],
    ["an orange circle below a purple square", "purple square above orange circle"],
]
TEXTS = [caption for captions in CAPTIONS for caption in captions]
COLOURS = [(215, 40, 40), (45, 85, 215), (235, 205, 35), (240, 135, 30)]


@pytest.fixture(scope="module")
def tokenizer():
    words = [c for caps in CAPTIONS for c in caps] * 5
    return train_wordpiece(iter(words), vocab_size=60, lowercase=True, min_frequency=1)  # small: words split


@pytest.fixture(scope="module")
def params():
    return ViltPretrainParams(hidden_size=32, num_layers=2, num_heads=4, patch_size=16, image_size=64,
                              max_image_size=96, max_text_len=16, max_image_len=-1, mlp_ratio=2)


def make_model(params, tokenizer, tasks=("mlm", "itm")):
    torch.manual_seed(0)
    return ViltPretrainingModel(build_config(params, len(tokenizer), tokenizer.pad_token_id), tasks)


@pytest.fixture(scope="module")
def arrows(tmp_path_factory):
    """A ViLT-schema arrow with 4 JPEGs of different sizes (one landscape) and their captions."""
    directory = tmp_path_factory.mktemp("arrows")
    images = []
    for i, colour in enumerate(COLOURS):
        buffer = io.BytesIO()
        Image.new("RGB", (96 if i == 3 else 64, 64), colour).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(CAPTIONS, pa.list_(pa.string())),
                      "image_id": [f"img{i}.jpg" for i in range(4)], "split": ["train"] * 4})
    with pa.OSFile(str(directory / "coco_caption_karpathy_train.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return directory


@pytest.fixture(scope="module")
def batch(arrows, tokenizer, params):
    pairs = CaptionPairs(image_dataset(arrows, "train", params.image_size, params.max_image_size))
    return PairCollator(tokenizer, params.max_text_len)([pairs[i] for i in range(len(pairs))])


def test_pairs_and_collation(arrows, batch, params):
    pairs = CaptionPairs(image_dataset(arrows, "train", params.image_size, params.max_image_size))
    assert len(pairs) == 8  # every caption of every image
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # the landscape image (96x64) sets the padded width; the others are masked beyond 64 pixels
    assert batch["pixel_values"].shape == (8, 3, 64, 96)
    assert batch["pixel_mask"][0, :, :64].all() and not batch["pixel_mask"][0, :, 64:].any()
    assert batch["pixel_mask"][6].all()
    assert batch["input_ids"].shape[1] <= params.max_text_len


def test_forward_backward_shapes(params, tokenizer, batch):
    model = make_model(params, tokenizer)
    image_embeds, image_mask = embed_images(model.vilt, batch["pixel_values"], batch["pixel_mask"], -1)
    assert image_embeds.shape == (8, 1 + 4 * 6, 32)  # image CLS + 4x6 patches of the padded 64x96 batch
    enc = encode(model.vilt, batch["input_ids"], batch["attention_mask"], image_embeds, image_mask)
    assert enc.text_feats.shape == (*batch["input_ids"].shape, 32)
    assert enc.image_feats.shape == image_embeds.shape and enc.pooled.shape == (8, 32)

    generator = torch.Generator().manual_seed(0)
    mlm_batch = MlmMasker(tokenizer, 0.5, whole_word=False)(batch, generator)
    itm_batch = swap_images_for_itm(batch, generator)
    out = model(mlm_batch=mlm_batch, itm_batch=itm_batch, wpa_weight=0.1)
    assert set(out) == {"loss", "mlm_loss", "mlm_acc", "itm_loss", "itm_acc", "itm_wpa_loss"}
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("mlm_loss", "itm_loss", "itm_wpa_loss")),
                                               rel=1e-5)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # DDP needs a gradient for every trainable parameter
    # the MLM decoder is its own matrix, as ViLT's MLMHead (not the word embeddings), and it learns
    decoder, words = model.mlm.mlm_score.decoder.weight, model.vilt.embeddings.text_embeddings.word_embeddings.weight
    assert decoder is not words and not torch.equal(decoder, words)
    assert decoder.grad is not None and decoder.grad.abs().sum() > 0


def test_single_task_freezes_unused_heads(params, tokenizer, batch):
    model = make_model(params, tokenizer, tasks=["mlm"])
    mlm_batch = MlmMasker(tokenizer, 0.5, whole_word=False)(batch, torch.Generator().manual_seed(0))
    model(mlm_batch=mlm_batch)["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not model.itm_score.weight.requires_grad

    itm_only = make_model(params, tokenizer, tasks=["itm"])
    itm_only(itm_batch=swap_images_for_itm(batch, torch.Generator().manual_seed(0)))["loss"].backward()
    assert [n for n, p in itm_only.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not itm_only.mlm.mlm_score.decoder.weight.requires_grad  # the untied decoder is MLM's alone


def test_mlm_masking_token_level(tokenizer, batch):
    masker = MlmMasker(tokenizer, 0.15, whole_word=False)
    masked = [masker(batch, torch.Generator().manual_seed(seed)) for seed in range(200)]
    special = batch["special_tokens_mask"].bool()
    labels = torch.stack([m["labels"] for m in masked])
    predicted = labels != -100
    assert not predicted[:, special].any()  # never [CLS]/[SEP]/[PAD]
    assert (labels[predicted] == batch["input_ids"].expand_as(labels)[predicted]).all()  # labels are the originals
    rate = predicted.float().sum() / (~special).sum() / len(masked)
    assert 0.12 < rate < 0.18
    inputs = torch.stack([m["input_ids"] for m in masked])[predicted]
    replaced = (inputs == tokenizer.mask_token_id).float().mean()
    assert 0.72 < replaced < 0.88  # BERT's 80% [MASK] (rest random or kept)
    again = masker(batch, torch.Generator().manual_seed(3))
    assert torch.equal(again["input_ids"], masked[3]["input_ids"])  # reproducible from the generator


def test_whole_word_masking_masks_all_pieces_of_a_word(tokenizer, batch):
    texts = [tokenizer.convert_ids_to_tokens(ids) for ids in batch["input_ids"]]
    assert any(t.startswith("##") for tokens in texts for t in tokens)  # the small vocabulary splits words
    masker = MlmMasker(tokenizer, 0.3, whole_word=True)
    saw_multi_piece_word_masked = False
    for seed in range(50):
        masked = masker(batch, torch.Generator().manual_seed(seed))["labels"] != -100
        for row in range(len(texts)):
            # the batch is image-major: row = caption TEXTS[row], truncated like the batch
            word_ids = tokenizer(TEXTS[row], truncation=True, max_length=batch["input_ids"].shape[1]).word_ids()
            for word in set(w for w in word_ids if w is not None):
                positions = [i for i, w in enumerate(word_ids) if w == word]
                flags = {bool(masked[row, i]) for i in positions}
                assert len(flags) == 1, (texts[row], positions)  # all pieces of a word, or none
                saw_multi_piece_word_masked |= len(positions) > 1 and flags == {True}
    assert saw_multi_piece_word_masked


def test_itm_negatives_swap_in_another_image(batch):
    generator = torch.Generator().manual_seed(0)
    negatives_seen = 0
    for _ in range(20):
        itm = swap_images_for_itm(batch, generator)
        labels = itm["itm_labels"]
        for i in range(len(labels)):
            same = torch.equal(itm["pixel_values"][i], batch["pixel_values"][i])
            assert same == bool(labels[i] == 1)  # negatives carry a different image, positives their own
        negatives_seen += int((labels == 0).sum())
        assert (labels == 0).sum() <= len(labels) // 2
    assert 0.3 < negatives_seen / (20 * len(batch["input_ids"])) <= 0.5  # about half (fewer on duplicate images)
    first = swap_images_for_itm(batch, torch.Generator().manual_seed(7))["itm_labels"]
    assert torch.equal(first, swap_images_for_itm(batch, torch.Generator().manual_seed(7))["itm_labels"])


def test_pretraining_itm_scores_the_items_false_images(arrows, params, tokenizer):
    """itm_negatives: dataset (the default): the step's ITM batch holds each position's own image where its label is
    1 and its false image (drawn from the dataset) where 0, and MLM sees the true images."""
    pairs = CaptionPairs(image_dataset(arrows, "train", params.image_size, params.max_image_size), false_images=True)
    batch = PairCollator(tokenizer, params.max_text_len, normalize=False)([pairs[(i, 40 + i)] for i in range(8)])
    assert (batch["false_image_index"] != batch["image_index"]).all()
    task = pretrain_task(tokenizer, ["mlm", "itm"], 0.15, True, 0.1, max_text_len=params.max_text_len)
    prepared = task.prepare(batch, torch.Generator().manual_seed(3))
    labels = prepared["itm_labels"]
    assert int(labels.sum()) == 4  # B // 2 matching, as ViLT
    seen = {}
    model = make_model(params, tokenizer)

    def recording_model(**batches):  # the real model, its inputs kept
        seen.update(batches)
        return model(**batches)

    out = task.losses(recording_model, prepared)
    assert torch.isfinite(out["loss"]) and set(out) >= {"mlm_loss", "itm_loss", "itm_wpa_loss"}
    own = normalize_pixels(batch["pixel_values"], batch["pixel_mask"])
    false = normalize_pixels(batch["false_pixel_values"], batch["false_pixel_mask"])
    for row in range(8):
        assert torch.equal(seen["itm_batch"]["pixel_values"][row], own[row] if labels[row] else false[row])
    assert torch.equal(seen["mlm_batch"]["pixel_values"], own)


def test_saved_model_loads_as_vilt_for_masked_lm(tmp_path, params, tokenizer, batch):
    model = make_model(params, tokenizer).eval()
    model.save(tmp_path)
    loaded, info = ViltForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert (tmp_path / ITM_HEAD_FILE).is_file()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}
    torch.manual_seed(0)
    expected = model.mlm(**inputs).logits
    torch.manual_seed(0)
    assert torch.allclose(loaded.eval()(**inputs).logits, expected, atol=1e-5)

    # the untied decoder survives the round trip through transformers (config.tie_word_embeddings False)
    assert not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.mlm_score.decoder.weight, model.mlm.mlm_score.decoder.weight)
    assert loaded.mlm_score.decoder.weight is not loaded.vilt.embeddings.text_embeddings.word_embeddings.weight

    reloaded = ViltPretrainingModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.itm_score.weight, model.itm_score.weight)
    assert torch.equal(reloaded.mlm.mlm_score.decoder.weight, model.mlm.mlm_score.decoder.weight)
    retrieval = retrieval_model_from_pretraining(tmp_path)
    assert isinstance(retrieval, ViltForImageAndTextRetrieval)
    assert torch.equal(retrieval.rank_output.weight[0], model.itm_score.weight[1])  # ITM "match" row
    assert torch.equal(retrieval.rank_output.bias, model.itm_score.bias[1:])
    assert retrieval.config.max_image_length == params.max_image_len  # the pretraining's, unless told
    all_patches = retrieval_model_from_pretraining(tmp_path, max_image_len=-1)  # as ViLT fine-tunes
    assert all_patches.config.max_image_length == -1
    assert vqa_model_from_pretraining(tmp_path, ["yes", "no"], max_image_len=-1).config.max_image_length == -1


def test_a_tied_transformers_checkpoint_stays_tied(tmp_path, params, tokenizer):
    """transformers' own ViLT checkpoints (tie_word_embeddings defaults to True) load as they were saved."""
    config = build_config(params, len(tokenizer), tokenizer.pad_token_id)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    ViltForMaskedLM(config).save_pretrained(tmp_path)
    model = ViltPretrainingModel.from_pretrained(tmp_path, tasks=["itm"])
    assert model.mlm.mlm_score.decoder.weight is model.vilt.embeddings.text_embeddings.word_embeddings.weight
    assert model.mlm.mlm_score.decoder.weight.requires_grad  # the word embeddings still train under ITM alone


def test_retrieval_training_loss_prefers_true_caption(params, tokenizer, batch):
    torch.manual_seed(0)
    model = ViltRetrievalTrainingModel(ViltForImageAndTextRetrieval(build_config(params, len(tokenizer), 0)))
    images = batch["pixel_values"][::2], batch["pixel_mask"][::2]  # 4 images, each with 2 candidate captions
    out = model(*images, batch["input_ids"], batch["attention_mask"])
    assert out["loss"].item() == pytest.approx(out["irtr_loss"].item())
    assert 0 < out["loss"].item() < 5 and 0 <= out["irtr_acc"].item() <= 1
    out["loss"].backward()
    assert model.retrieval.rank_output.weight.grad is not None


def test_vqa_model_from_pretraining_saves_as_vilt_for_question_answering(tmp_path, params, tokenizer, batch):
    pretrained = make_model(params, tokenizer)
    pretrained.save(tmp_path / "pretrained")
    answers = ["yes", "no", "2", "red"]
    vqa = vqa_model_from_pretraining(tmp_path / "pretrained", answers).eval()
    assert vqa.config.id2label == dict(enumerate(answers)) and vqa.config.num_labels == 4
    for name, value in pretrained.vilt.state_dict().items():
        assert torch.equal(vqa.vilt.state_dict()[name], value), name
    vqa.save_pretrained(tmp_path / "vqa")
    loaded, info = ViltForQuestionAnswering.from_pretrained(tmp_path / "vqa", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert loaded.config.id2label[3] == "red"  # transformers users get answer strings, not label numbers
    # our path (embed_images + encode + classifier) gives what transformers' own forward gives on the saved model
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}
    ours = ViltVqaTrainingModel(vqa).logits(inputs["pixel_values"], inputs["pixel_mask"], inputs["input_ids"],
                                            inputs["attention_mask"])
    assert torch.allclose(loaded.eval()(**inputs).logits, ours, atol=1e-5)


def test_vqa_loss_is_vilt_scaled_bce_and_score_is_the_top_answers(params, tokenizer, batch):
    torch.manual_seed(0)
    model = ViltVqaTrainingModel(vqa_model_from_pretraining_free(params, tokenizer, num_answers=3)).eval()  # no dropout
    samples = [{"pixel_values": batch["pixel_values"][i, :, :64, :64], "text": "what is it?",
                "answer_labels": labels, "answer_scores": scores, "question_id": i, "image_index": i}
               for i, (labels, scores) in enumerate([([0], [1.0]), ([1, 2], [0.6, 0.3]), ([], []), ([2], [0.9])])]
    collated = QuestionCollator(tokenizer, params.max_text_len, 3)(samples)
    assert torch.allclose(collated["targets"], torch.tensor([[1, 0, 0], [0, 0.6, 0.3], [0, 0, 0], [0, 0, 0.9]]))
    out = model(collated["pixel_values"], collated["pixel_mask"], collated["input_ids"], collated["attention_mask"],
                collated["targets"])
    logits = model.logits(collated["pixel_values"], collated["pixel_mask"], collated["input_ids"],
                          collated["attention_mask"])
    assert out["loss"].item() == pytest.approx(
        3 * F.binary_cross_entropy_with_logits(logits, collated["targets"]).item(), rel=1e-5)
    expected_score = collated["targets"][torch.arange(4), logits.argmax(1)].mean().item()
    assert out["vqa_score"].item() == pytest.approx(expected_score)


def vqa_model_from_pretraining_free(params, tokenizer, num_answers: int) -> ViltForQuestionAnswering:
    config = build_config(params, len(tokenizer), tokenizer.pad_token_id)
    config.id2label = {i: str(i) for i in range(num_answers)}
    return ViltForQuestionAnswering(config)


def test_decay_groups_spare_bias_and_norms_and_speed_up_new_heads(params, tokenizer):
    model = ViltVqaTrainingModel(vqa_model_from_pretraining_free(params, tokenizer, num_answers=5))
    groups = decay_groups(model, weight_decay=0.01, lr=1e-4, head_lr_mult={"vqa.classifier.": 10.0})
    of = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(of) == len(named)  # every trainable parameter in exactly one group
    assert of[id(named["vqa.classifier.0.weight"])]["lr"] == pytest.approx(1e-3)
    assert of[id(named["vqa.classifier.0.weight"])]["weight_decay"] == 0.01
    assert of[id(named["vqa.classifier.1.weight"])]["weight_decay"] == 0.0  # LayerNorm inside the head
    assert of[id(named["vqa.classifier.3.bias"])]["lr"] == pytest.approx(1e-3)
    assert of[id(named["vqa.vilt.encoder.layer.0.attention.attention.query.weight"])] == \
        {"params": of[id(named["vqa.vilt.encoder.layer.0.attention.attention.query.weight"])]["params"],
         "weight_decay": 0.01, "lr": 1e-4}
    assert of[id(named["vqa.vilt.encoder.layer.0.attention.attention.query.bias"])]["weight_decay"] == 0.0


def test_vit_init_matches_timm_blocks(tmp_path, params, tokenizer):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                            num_classes=0).eval()
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    model = make_model(params, tokenizer).eval()
    load_vit_weights(model.vilt, str(tmp_path / "vit.safetensors"))
    vilt = model.vilt
    assert torch.equal(vilt.embeddings.patch_embeddings.projection.weight, vit.patch_embed.proj.weight)
    assert torch.equal(vilt.embeddings.position_embeddings, vit.pos_embed)
    tokens = torch.randn(2, 17, 32)
    expected = vit.blocks(tokens)
    got = tokens
    for layer in vilt.encoder.layer:
        got = layer(got)[0]
    assert model.config.layer_norm_eps == 1e-6  # timm's (ViLT's) ViT LayerNorm; transformers' default is 1e-12
    assert torch.allclose(got, expected, atol=1e-5)  # the same blocks, LayerNorm eps included

    # a .pth state dict as the original jx release ships it (with its classifier head), wrapped or not
    torch.save({"model": {**vit.state_dict(), "head.weight": torch.zeros(10, 32)}}, tmp_path / "jx.pth")
    fresh = make_model(params, tokenizer).eval()
    load_vit_weights(fresh.vilt, str(tmp_path / "jx.pth"))
    assert torch.equal(fresh.vilt.encoder.layer[1].output.dense.weight, vit.blocks[1].mlp.fc2.weight)

    small = VisionTransformer(img_size=64, patch_size=16, embed_dim=16, depth=2, num_heads=4, num_classes=0)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    from vlflow.errors import StageError
    with pytest.raises(StageError, match="vit_init"):
        load_vit_weights(model.vilt, str(tmp_path / "small.safetensors"))


def test_recall_at_k_on_hand_made_scores():
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, texts 3,4 -> image 2
    text_image = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor([
        [0.9, 0.1, 0.0],  # text 0: image 0 first
        [0.2, 0.8, 0.1],  # text 1: image 0 second
        [0.1, 0.3, 0.7],  # text 2: image 1 second
        [0.0, 0.1, 0.5],  # text 3: image 2 first
        [0.6, 0.5, 0.4],  # text 4: image 2 third
    ])
    r = recall_at_k(scores, text_image, ks=(1, 2, 3))
    assert r["ir_r1"] == pytest.approx(2 / 5)
    assert r["ir_r2"] == pytest.approx(4 / 5)
    assert r["ir_r3"] == pytest.approx(1.0)
    # image 0 ranks texts [0, 4, 1, ...] -> R@1 hit; image 1 ranks [1, 4, 2] -> hit at 3; image 2 ranks [2, 3, 4]
    assert r["tr_r1"] == pytest.approx(1 / 3)
    assert r["tr_r2"] == pytest.approx(2 / 3)
    assert r["tr_r3"] == pytest.approx(1.0)


def test_coco_subsets_need_5000_images():
    assert list(subsets_for(["1k", "5k"], 1000)) == ["all"]
    folds = subsets_for(["1k", "5k"], 5000)
    assert [len(f) for f in folds["1k"]] == [1000] * 5 and folds["5k"] == [range(5000)]
    # folds re-index images: a perfect diagonal score matrix stays perfect within each fold
    text_image = torch.arange(5000).repeat_interleave(2)
    scores = (text_image[:, None] == torch.arange(5000)[None]).float()
    assert subset_recall(scores, text_image, folds["1k"])["ir_r1"] == 1.0


def test_vqa_stages_name_a_wrong_arrows_input(arrows):
    from vlflow.stages.vilt.data import load_answers, vqa_dataset

    from vlflow.errors import StageError

    with pytest.raises(StageError, match="vqa_answers.json") as failure:
        load_answers(arrows)  # caption arrows, not arrow.vqav2's output
    assert failure.value.field == "inputs.arrows"
    with pytest.raises(StageError, match="vqav2_train.arrow"):
        vqa_dataset(arrows, ["train"], 64, 64)


def test_evaluate_vqa_scores_predictions_with_the_official_accuracy():
    from vlflow.stages.vilt.evaluate_vqa import official_vqa_accuracy

    predictions = [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "2"},
                   {"question_id": 3, "answer": "yes"}]
    annotators = {"1": ["two"] * 3 + ["2"] * 2 + ["3"] * 5,  # normalised: 5 say "2" -> 1.0
                  "2": ["two"] * 10,  # all the same: compared as given -> 0.0
                  "4": ["yes"] * 10}  # not predicted
    assert official_vqa_accuracy(predictions, annotators) == {"vqa_accuracy": 0.5, "vqa_accuracy_questions": 2}
    assert official_vqa_accuracy(predictions, {}) == {}
