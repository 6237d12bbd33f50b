"""ViLT with pretraining heads, on the transformers `ViltModel` backbone.

`ViltPretrainingModel` keeps the backbone and MLM head as a plain `ViltForMaskedLM` (so the saved model loads with
`ViltForMaskedLM.from_pretrained`) and the ITM head beside it (saved to its own file, as transformers has no ITM head).
Images are embedded with the backbone's own `visual_embed` (patch sampling up to `max_image_len`) and passed to the
transformer as `image_embeds`: the same path serves training and retrieval evaluation, where each image is embedded
once and scored against many texts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltForMaskedLM, ViltForQuestionAnswering

ITM_HEAD_FILE = "itm_head.safetensors"


def build_config(p, vocab_size: int, pad_token_id: int) -> ViltConfig:
    """ViltConfig from the stage's model params (`ViltModelParams`)."""
    return ViltConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        intermediate_size=p.hidden_size * p.mlp_ratio,
        hidden_dropout_prob=p.dropout,
        attention_probs_dropout_prob=p.dropout,
        image_size=p.image_size,
        patch_size=p.patch_size,
        max_image_length=p.max_image_len,
        max_position_embeddings=p.max_text_len,
        initializer_range=p.initializer_range,
        layer_norm_eps=p.layer_norm_eps,
        # ViLT's MLM head has its own decoder matrix (vilt/modules/heads.py MLMHead: a fresh Linear(hidden, vocab)),
        # not the word embeddings; the config says so, so from_pretrained keeps them apart too
        tie_word_embeddings=False,
        architectures=["ViltForMaskedLM"],
    )


@dataclass
class Encoded:
    text_feats: torch.Tensor  # [B, Lt, D]
    image_feats: torch.Tensor  # [B, 1 + Li, D] (image CLS first)
    text_mask: torch.Tensor  # [B, Lt]
    image_mask: torch.Tensor  # [B, 1 + Li]
    pooled: torch.Tensor  # [B, D], tanh pooler on the first (text CLS) token


def embed_images(vilt, pixel_values, pixel_mask, max_image_len: int):
    """Patch embeddings (+ image CLS, positions, sampled to max_image_len patches) and their mask."""
    image_embeds, image_mask, _ = vilt.embeddings.visual_embed(pixel_values, pixel_mask, max_image_length=max_image_len)
    return image_embeds, image_mask


def encode(vilt, input_ids, attention_mask, image_embeds, image_mask) -> Encoded:
    out = vilt(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds, pixel_mask=image_mask)
    text_len = input_ids.shape[1]
    hidden = out.last_hidden_state
    return Encoded(hidden[:, :text_len], hidden[:, text_len:], attention_mask, image_mask, out.pooler_output)


class ViltPretrainingModel(nn.Module):
    """ViltForMaskedLM (backbone + BERT-style MLM head with its own decoder, as ViLT) + ITM head (Linear hidden->2).
    A checkpoint whose config ties the decoder to the word embeddings (transformers' default) stays tied."""

    def __init__(self, config: ViltConfig, tasks=("mlm", "itm")):
        super().__init__()
        self.mlm = ViltForMaskedLM(config)
        self.itm_score = nn.Linear(config.hidden_size, 2)
        self.itm_score.apply(self.mlm._init_weights)
        self.tasks = tuple(tasks)
        # DDP requires every trainable parameter to get a gradient: freeze the parts no task uses.
        if "mlm" not in self.tasks:
            self.mlm.mlm_score.transform.requires_grad_(False)
            self.mlm.mlm_score.bias.requires_grad_(False)
            if not config.tie_word_embeddings:  # a tied decoder is the word embeddings, which the backbone trains
                self.mlm.mlm_score.decoder.requires_grad_(False)
        if "itm" not in self.tasks:
            self.itm_score.requires_grad_(False)
            self.mlm.vilt.pooler.requires_grad_(False)

    @property
    def vilt(self):
        return self.mlm.vilt

    @property
    def config(self) -> ViltConfig:
        return self.mlm.config

    def forward(self, mlm_batch: dict | None = None, itm_batch: dict | None = None, wpa_weight: float = 0.0) -> dict:
        """Losses and accuracies for the given task batches (one backbone pass each, as in ViLT)."""
        out = {}
        max_image_len = self.config.max_image_length
        if mlm_batch is not None:
            image_embeds, image_mask = embed_images(self.vilt, mlm_batch["pixel_values"], mlm_batch["pixel_mask"],
                                                    max_image_len)
            enc = encode(self.vilt, mlm_batch["input_ids"], mlm_batch["attention_mask"], image_embeds, image_mask)
            logits = self.mlm.mlm_score(enc.text_feats).float()  # the loss in fp32 from bf16/fp16 logits
            labels = mlm_batch["labels"]
            out["mlm_loss"] = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
            # accuracy over masked tokens without boolean indexing (no sync, no dynamic shape)
            predicted = labels != -100
            hits = ((logits.argmax(-1) == labels) & predicted).sum()
            out["mlm_acc"] = (hits / predicted.sum().clamp(min=1)).detach()
        if itm_batch is not None:
            image_embeds, image_mask = embed_images(self.vilt, itm_batch["pixel_values"], itm_batch["pixel_mask"],
                                                    max_image_len)
            enc = encode(self.vilt, itm_batch["input_ids"], itm_batch["attention_mask"], image_embeds, image_mask)
            logits = self.itm_score(enc.pooled).float()
            labels = itm_batch["itm_labels"]
            out["itm_loss"] = F.cross_entropy(logits, labels)
            out["itm_acc"] = (logits.argmax(-1) == labels).float().mean().detach()
            if wpa_weight > 0:
                out["itm_wpa_loss"] = wpa_weight * word_patch_alignment_loss(enc, labels)
        out["loss"] = sum(v for k, v in out.items() if k.endswith("_loss"))
        return out

    def save(self, directory: Path) -> None:
        """`directory` loads with ViltForMaskedLM.from_pretrained; the ITM head goes to ITM_HEAD_FILE beside it."""
        self.mlm.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.itm_score.state_dict().items()},
                  str(Path(directory) / ITM_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, tasks=("mlm", "itm")) -> "ViltPretrainingModel":
        """Loads a saved pretraining model, or any transformers ViLT checkpoint (then the ITM head starts fresh)."""
        mlm = ViltForMaskedLM.from_pretrained(str(directory))
        model = cls(mlm.config, tasks)
        model.mlm.load_state_dict(mlm.state_dict())
        itm_file = Path(directory) / ITM_HEAD_FILE
        if itm_file.is_file():
            model.itm_score.load_state_dict(load_file(str(itm_file)))
        return model


class ViltRetrievalTrainingModel(nn.Module):
    """ViltForImageAndTextRetrieval trained as ViLT's irtr: each image is scored with its caption and K false
    captions; cross-entropy over the 1 + K candidates with the true caption as target."""

    def __init__(self, retrieval: ViltForImageAndTextRetrieval):
        super().__init__()
        self.retrieval = retrieval

    @property
    def config(self) -> ViltConfig:
        return self.retrieval.config

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask) -> dict:
        """pixel_values [B, ...]; input_ids [B * (1 + K), L], grouped per image, true caption first."""
        vilt = self.retrieval.vilt
        batch_size = len(pixel_values)
        candidates = len(input_ids) // batch_size
        image_embeds, image_mask = embed_images(vilt, pixel_values, pixel_mask, self.config.max_image_length)
        # each image is embedded once and shared by its candidates
        image_embeds = image_embeds.repeat_interleave(candidates, dim=0)
        image_mask = image_mask.repeat_interleave(candidates, dim=0)
        enc = encode(vilt, input_ids, attention_mask, image_embeds, image_mask)
        scores = self.retrieval.rank_output(enc.pooled).view(batch_size, candidates)
        target = torch.zeros(batch_size, dtype=torch.long, device=scores.device)
        loss = F.cross_entropy(scores.float(), target)
        return {"loss": loss, "irtr_loss": loss.detach(), "irtr_acc": (scores.argmax(1) == 0).float().mean().detach()}


def retrieval_model_from_pretraining(directory: str | Path,
                                     max_image_len: int | None = None) -> ViltForImageAndTextRetrieval:
    """ViltForImageAndTextRetrieval with the pretrained backbone and the rank head set from ITM row 1 (as ViLT).
    `max_image_len`: patches sampled per image from here on (ViLT fine-tunes with all, -1); None keeps the
    pretraining's."""
    pretrained = ViltPretrainingModel.from_pretrained(directory)
    config = pretrained.config
    config.architectures = ["ViltForImageAndTextRetrieval"]
    if max_image_len is not None:
        config.max_image_length = max_image_len
    model = ViltForImageAndTextRetrieval(config)
    model.vilt.load_state_dict(pretrained.vilt.state_dict())
    with torch.no_grad():
        model.rank_output.weight.copy_(pretrained.itm_score.weight[1:2])
        model.rank_output.bias.copy_(pretrained.itm_score.bias[1:2])
    return model


class ViltVqaTrainingModel(nn.Module):
    """ViltForQuestionAnswering trained as ViLT's vqa task: binary cross-entropy of the classifier's logits against
    the soft answer scores, times the number of answers (ViLT's scaling)."""

    def __init__(self, vqa: ViltForQuestionAnswering):
        super().__init__()
        self.vqa = vqa

    @property
    def config(self) -> ViltConfig:
        return self.vqa.config

    def logits(self, pixel_values, pixel_mask, input_ids, attention_mask) -> torch.Tensor:
        vilt = self.vqa.vilt
        image_embeds, image_mask = embed_images(vilt, pixel_values, pixel_mask, self.config.max_image_length)
        return self.vqa.classifier(encode(vilt, input_ids, attention_mask, image_embeds, image_mask).pooled)

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask, targets) -> dict:
        logits = self.logits(pixel_values, pixel_mask, input_ids, attention_mask).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()  # VQA score of the top answer
        return {"loss": loss, "vqa_loss": loss.detach(), "vqa_score": score.detach()}


def vqa_model_from_pretraining(directory: str | Path, answers: list[str],
                               max_image_len: int | None = None) -> ViltForQuestionAnswering:
    """ViltForQuestionAnswering with the pretrained backbone and a fresh classifier over `answers` (as ViLT);
    `max_image_len` as in `retrieval_model_from_pretraining`."""
    pretrained = ViltPretrainingModel.from_pretrained(directory)
    config = pretrained.config
    config.architectures = ["ViltForQuestionAnswering"]
    if max_image_len is not None:
        config.max_image_length = max_image_len
    config.id2label = dict(enumerate(answers))
    config.label2id = {answer: i for i, answer in enumerate(answers)}
    model = ViltForQuestionAnswering(config)
    model.vilt.load_state_dict(pretrained.vilt.state_dict())
    return model


# ---------------------------------------------------------------------------------------------------------------
# Word-patch alignment (ViLT's ITM auxiliary loss): inexact proximal optimal transport (IPOT) between text tokens and
# image patches; the OT distance is pulled down for matching pairs and pushed up for swapped ones.

def cost_matrix_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """[B, Lx, D], [B, Ly, D] -> [B, Lx, Ly] cosine distances."""
    return 1 - F.normalize(x, dim=-1, eps=eps) @ F.normalize(y, dim=-1, eps=eps).transpose(1, 2)


@torch.no_grad()
def ipot(cost, x_len, x_pad, y_len, y_pad, joint_pad, beta: float, iterations: int, k: int = 1):
    """IPOT transport plan [B, N, M] for cost [B, M, N] (Xie et al. 2018), padded positions excluded."""
    b, m, n = cost.size()
    sigma = torch.ones(b, m, dtype=cost.dtype, device=cost.device) / x_len.unsqueeze(1)
    plan = torch.ones(b, n, m, dtype=cost.dtype, device=cost.device)
    kernel = torch.exp(-cost.transpose(1, 2) / beta)
    sigma.masked_fill_(x_pad, 0)
    joint_pad = joint_pad.transpose(1, 2)
    plan.masked_fill_(joint_pad, 0)
    kernel.masked_fill_(joint_pad, 0)
    x_len = x_len.view(b, 1, 1)
    y_len = y_len.view(b, 1, 1)
    x_mask = (x_pad.to(cost.dtype) * 1e4).unsqueeze(1)  # makes padded entries of delta/sigma ~0
    y_mask = (y_pad.to(cost.dtype) * 1e4).unsqueeze(1)
    for _ in range(iterations):
        q = kernel * plan
        sigma = sigma.view(b, m, 1)
        for _ in range(k):
            delta = 1 / (y_len * q.matmul(sigma).view(b, 1, n) + y_mask)
            sigma = 1 / (x_len * delta.matmul(q) + x_mask)
        plan = delta.view(b, n, 1) * q * sigma
    plan.masked_fill_(joint_pad, 0)
    return plan


def word_patch_alignment_loss(enc: Encoded, itm_labels: torch.Tensor, beta: float = 0.5,
                              iterations: int = 50) -> torch.Tensor:
    text_mask = enc.text_mask.bool().clone()
    image_mask = enc.image_mask.bool().clone()
    # exclude [CLS]/[SEP] and the image CLS from the alignment
    text_mask[torch.arange(len(text_mask), device=text_mask.device), text_mask.sum(1) - 1] = False
    text_mask[:, 0] = False
    image_mask[:, 0] = False
    text_pad, image_pad = ~text_mask, ~image_mask
    cost = cost_matrix_cosine(enc.text_feats.float(), enc.image_feats.float())
    joint_pad = text_pad.unsqueeze(-1) | image_pad.unsqueeze(-2)
    cost = cost.masked_fill(joint_pad, 0)
    text_len = (~text_pad).sum(1).to(cost.dtype)
    image_len = (~image_pad).sum(1).to(cost.dtype)
    plan = ipot(cost.detach(), text_len, text_pad, image_len, image_pad, joint_pad, beta, iterations)
    distance = torch.diagonal(cost.matmul(plan.detach()), dim1=-2, dim2=-1).sum(-1)
    # pulled down for matching pairs, pushed up for swapped ones (torch.where: no data-dependent shapes)
    return torch.where(itm_labels == 1, distance, -distance).sum() / len(distance)


# ---------------------------------------------------------------------------------------------------------------
# ViT initialisation (ViLT starts from an ImageNet ViT-B/32 in timm's layout)

def vit_state_to_vilt(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Renames timm VisionTransformer weights to ViltModel keys (qkv split into query/key/value)."""
    out = {
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            for timm_name, vilt_name in names.items():
                out[f"encoder.layer.{i}.{vilt_name}.{kind}"] = state[f"blocks.{i}.{timm_name}.{kind}"]
            query, key, value = state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            for name, tensor in (("query", query), ("key", key), ("value", value)):
                out[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] = tensor
    return out


def load_vit_weights(vilt, source: str) -> None:
    """Initialises ViltModel's patch embedding, positions and encoder from a timm ViT: a local weights file
    (.safetensors / .pth state dict in timm's layout; a `{"model": state}` wrapper is unwrapped; heads are ignored)
    or a timm model name (its pretrained weights must be reachable: hub or local cache).

    Which weights: ViLT (timm 0.4.5) started from `jx_vit_base_p32_384-830016f5.pth`, Google's original ViT-B/32
    (ImageNet-21k pretraining, ImageNet-1k fine-tuning at 384, mean/std 0.5). timm >= 0.9 resolves the name
    `vit_base_patch32_384` to `augreg_in21k_ft_in1k` (Steiner et al. 2021, "How to train your ViT": stronger
    augmentation and regularisation: other weights, other features) and no longer lists the original. Both are
    timm-layout state dicts of the same shapes, so either loads here; to start from what ViLT started from, give the
    jx file's path. LayerNorm: timm's ViT uses eps 1e-6 (ViltModelParams
    `layer_norm_eps`, default 1e-6); transformers' ViltConfig defaults to 1e-12."""
    import timm
    from timm.layers import resample_abs_pos_embed

    from vlflow.errors import StageError

    path = Path(source)
    try:
        if path.is_file():
            state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
            state = state.get("model", state) if isinstance(state, dict) else state
        else:
            state = timm.create_model(source, pretrained=True).state_dict()
    except Exception as exc:  # a missing name/file or no network: a user-facing error
        raise StageError(f"cannot load ViT weights {source!r}: {exc}", field="with.vit_init") from exc
    config = vilt.config
    try:
        mapped = vit_state_to_vilt(state, config.num_hidden_layers)
    except KeyError as exc:
        raise StageError(f"{source!r} is not a timm ViT with {config.num_hidden_layers} blocks (missing {exc})",
                         field="with.vit_init") from None
    grid = config.image_size // config.patch_size
    mapped["embeddings.position_embeddings"] = resample_abs_pos_embed(
        mapped["embeddings.position_embeddings"], new_size=(grid, grid), num_prefix_tokens=1)
    own = vilt.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
    if wrong:
        raise StageError(f"{source!r} does not match the model size: {wrong[:3]}", field="with.vit_init")
    vilt.load_state_dict(mapped, strict=False)
