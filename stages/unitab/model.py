"""UniTAB: image + text encoder memory, causal decoder over one vocabulary of text tokens, <obj>, </obj> and box bins.

    image -> ResNet (frozen BN) -> 1x1 conv to d_model --------------+   positions: 2-D sine for the image, 0 for text
                                                                    concat -> DETR encoder (positions added to q/k
    text  -> RobertaModel -> Linear+LayerNorm to d_model -----------+         in every layer)
    previous tokens -> LayerNorm(embedding + learned positions) -> causal DETR decoder (positions added to the
                       self-attention q/k and cross-attention q, memory positions to its k, in every layer)
                    -> final LayerNorm -> Linear tied to the token embedding -> logits

The transformer follows microsoft/UniTAB models/transformer_unitab.py (post-norm DETR layers, xavier init, one
cross-attention to the joint image+text memory, decoder positions as `query_pos`).
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import GroupNorm, freeze_batch_norm_2d
from torch import nn
from transformers import RobertaConfig, RobertaModel
from vlflow.stages.common.fit import ema_update  # noqa: F401  (MDETR/UniTAB `--ema`, shared by the training loop)

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary layout: [0, text_vocab) text tokens, then <obj>, </obj>, then num_bins coordinate bins.

@dataclass(frozen=True)
class TokenLayout:
    text_vocab: int
    num_bins: int

    @property
    def obj_start(self) -> int:
        return self.text_vocab

    @property
    def obj_end(self) -> int:
        return self.text_vocab + 1

    @property
    def first_bin(self) -> int:
        return self.text_vocab + 2

    @property
    def size(self) -> int:
        return self.text_vocab + 2 + self.num_bins

    def box_to_tokens(self, box) -> list[int]:
        """x1,y1,x2,y2 in [0,1] -> four bin tokens `int(v * (num_bins - 1))` (UniTAB's quantisation)."""
        bins = [min(max(int(float(v) * (self.num_bins - 1)), 0), self.num_bins - 1) for v in box]
        return [self.first_bin + b for b in bins]

    def tokens_to_box(self, tokens) -> list[float]:
        """Four bin tokens -> x1,y1,x2,y2 in [0,1] (the lower edge of each bin)."""
        return [(int(t) - self.first_bin) / (self.num_bins - 1) for t in tokens]

    def is_bin(self, token: int) -> bool:
        return self.first_bin <= token < self.size


# ---------------------------------------------------------------------------------------------------------------
# Image side

MDETR_BACKBONE_PREFIX = "backbone.0.body."  # MDETR/UniTAB checkpoints: model.backbone[0] (Backbone).body
FROZEN_BY_UNITAB = ("conv1.", "bn1.", "layer1.")  # MDETR's BackboneBase trains only layer2..layer4


class BackboneWeightsError(ValueError):
    """A backbone_weights file that cannot be read or does not fit the backbone."""


def backbone_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The ResNet trunk tensors of a local checkpoint file: a torchvision / timm ResNet state dict, or an MDETR /
    UniTAB checkpoint (`{"model": ...}` with `backbone.0.body.` keys, e.g. MDETR's pretrained_resnet101_checkpoint.pth).
    Raises BackboneWeightsError naming the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # zip errors: RuntimeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneWeightsError(f"backbone_weights {path}: cannot read a torch checkpoint ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"backbone_weights {path}: expected a state dict, got {type(state).__name__}")
    if any(key.startswith(MDETR_BACKBONE_PREFIX) for key in state):
        state = {key[len(MDETR_BACKBONE_PREFIX):]: value for key, value in state.items()
                 if key.startswith(MDETR_BACKBONE_PREFIX)}
    return state


# MDETR / UniTAB checkpoint names (ashkamath/mdetr models/{mdetr,transformer}.py, microsoft/UniTAB
# models/transformer_unitab.py) for ours, as (our prefix, their prefix); the first match wins. The decoder layer's
# norm2/norm3 are MDETR's norm3/norm4 (its norm2 belonged to a text cross-attention it commented out).
CHECKPOINT_NAMES = (
    ("backbone.body.", "backbone.0.body."),
    ("input_proj.", "input_proj."),
    ("text_encoder.", "transformer.text_encoder."),
    ("text_proj.0.", "transformer.resizer.fc."),
    ("text_proj.1.", "transformer.resizer.layer_norm."),
    ("transformer.encoder_layers.", "transformer.encoder.layers."),
    ("transformer.decoder_norm.", "transformer.decoder.norm."),
    ("token_embed.", "transformer.embedding.word_embeddings."),  # UniTAB only (MDETR decodes object queries)
    ("decoder_pos.", "transformer.embedding.position_embeddings."),
    ("embed_norm.", "transformer.embedding.LayerNorm."),
)
DECODER_LAYER_NAMES = {"cross_attn.": "cross_attn_image.", "norm2.": "norm3.", "norm3.": "norm4."}


class CheckpointError(ValueError):
    """An init_checkpoint that cannot be read or that initialises nothing of the model."""


def checkpoint_name(ours: str) -> str | None:
    """Our state-dict name -> the MDETR/UniTAB checkpoint's name for the same tensor (None: it has none)."""
    if ours.startswith("transformer.decoder_layers."):
        index, rest = ours[len("transformer.decoder_layers."):].split(".", 1)
        for mine, theirs in DECODER_LAYER_NAMES.items():
            if rest.startswith(mine):
                rest = theirs + rest[len(mine):]
                break
        return f"transformer.decoder.layers.{index}.{rest}"
    for mine, theirs in CHECKPOINT_NAMES:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    return None


@dataclass
class CheckpointReport:
    """What `load_checkpoint` did: checkpoint name -> our name for loaded tensors, checkpoint name -> reason for
    skipped ones, and our tensors the checkpoint did not initialise."""

    path: str
    loaded: dict[str, str]
    skipped: dict[str, str]
    not_initialised: list[str]

    def covers(self, prefix: str) -> bool:
        """Whether every tensor of ours under `prefix` came from the checkpoint (BN step counters aside)."""
        return not any(name.startswith(prefix) for name in self.not_initialised)

    def log_to(self, log) -> None:
        counts: dict[str, int] = {}
        for ours in self.loaded.values():
            part = ours.split(".")[0] if not ours.startswith("transformer.") else ".".join(ours.split(".")[:2])
            counts[part] = counts.get(part, 0) + 1
        log.info("init_checkpoint %s: loaded %d tensors (%s), skipped %d, %d of ours keep their initialisation",
                 self.path, len(self.loaded), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                 len(self.skipped), len(self.not_initialised))
        for theirs, reason in self.skipped.items():
            log.info("init_checkpoint: skipped %s: %s", theirs, reason)
        for ours in self.not_initialised:
            log.info("init_checkpoint: not in the checkpoint, keeps its initialisation: %s", ours)

    def as_dict(self) -> dict:
        return {"path": self.path, "loaded": self.loaded, "skipped": self.skipped,
                "not_initialised": self.not_initialised}


def read_checkpoint(path: str, what: str) -> dict[str, torch.Tensor]:
    """A local state dict, or an MDETR/UniTAB training checkpoint: its `model_ema` when it has one (as UniTAB's
    --load), else its `model`. Errors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # zip errors: RuntimeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} {path}: cannot read a torch checkpoint ({reason})") from None
    if isinstance(state, dict):
        for key in ("model_ema", "model"):
            if isinstance(state.get(key), dict):
                return state[key]
        if all(isinstance(value, torch.Tensor) for value in state.values()):
            return state
    raise CheckpointError(f"{what} {path}: expected a state dict or an MDETR/UniTAB checkpoint "
                          f"({{'model': state dict}}), got {type(state).__name__}")


def load_checkpoint(model: nn.Module, path: str) -> CheckpointReport:
    """UniTAB's `--load`: initialise every tensor of ours whose MDETR/UniTAB name is in the checkpoint with the same
    shape (backbone, input_proj, text encoder, resizer, encoder/decoder layers, and UniTAB's decoder embeddings).
    Tensors of another shape or of no part of this model (MDETR's detection heads, query embeddings, RoBERTa's
    pooler) are skipped, each with its reason. Raises CheckpointError if nothing at all matches."""
    state = read_checkpoint(path, "init_checkpoint")
    ours = model.state_dict()
    wanted = {checkpoint_name(name): name for name in ours}
    wanted.pop(None, None)  # e.g. the output layer: tied to token_embed, which is loaded
    loaded, skipped, values = {}, {}, {}
    for theirs, tensor in state.items():
        mine = wanted.get(theirs)
        if mine is None:
            skipped[theirs] = "no such tensor in this model"
        elif tuple(tensor.shape) != tuple(ours[mine].shape):
            skipped[theirs] = f"shape {tuple(tensor.shape)}, ours ({mine}) is {tuple(ours[mine].shape)}"
        else:
            loaded[theirs], values[mine] = mine, tensor
    if not loaded:
        example = next(iter(state), "(empty)")
        raise CheckpointError(f"init_checkpoint {path}: none of its {len(state)} tensors fits this model (e.g. "
                              f"{example}: {skipped.get(example, 'empty file')}); expected an MDETR/UniTAB "
                              f"checkpoint (backbone.0.body.*, transformer.encoder.layers.*, ...) of the same sizes")
    model.load_state_dict(values, strict=False)
    storage = {ours[name].data_ptr() for name in values}  # a tied tensor is initialised with its twin
    not_initialised = []
    for name, tensor in ours.items():  # a tied pair is listed once (the output layer shares token_embed)
        if name not in values and tensor.data_ptr() not in storage and not name.endswith("num_batches_tracked"):
            not_initialised.append(name)
            storage.add(tensor.data_ptr())
    return CheckpointReport(path, loaded, skipped, not_initialised)


class Backbone(nn.Module):
    """ResNet trunk (timm's ResNets have torchvision's layout and tensor names) returning one feature map.

    norm: `frozen_bn` as DETR/MDETR/UniTAB (BatchNorm statistics and affine fixed: only meaningful with pretrained
    weights, which the training stage therefore requires); `batch_norm` trainable BatchNorm and `group_norm`
    GroupNorm(8), for small backbones trained from scratch. `freeze_stem_and_layer1()` is MDETR's rule
    (conv1/bn1/layer1 get no gradient)."""

    def __init__(self, name: str, feature_level: int = -1, weights: str | None = None, norm: str = "frozen_bn"):
        super().__init__()
        extra = {"norm_layer": partial(GroupNorm, num_groups=8)} if norm == "group_norm" else {}
        # zero_init_last would make frozen residual branches permanently zero when training from scratch
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(feature_level,),
                                      zero_init_last=False, **extra)
        if weights:
            self.load_weights(weights)
        if norm == "frozen_bn":
            self.body = freeze_batch_norm_2d(self.body)
        self.num_channels = self.body.feature_info.channels()[-1]

    def load_weights(self, path: str) -> None:
        """Every trunk tensor must come from the file (an ImageNet classifier's `fc.*` is ignored)."""
        state = backbone_state_dict(path)
        expected = self.body.state_dict()
        missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
        if missing:
            raise BackboneWeightsError(f"backbone_weights {path}: {len(missing)} of {len(expected)} tensors of the "
                                       f"{type(self.body).__name__} trunk are missing (e.g. {missing[0]}); expected a "
                                       f"torchvision/timm ResNet state dict or an MDETR/UniTAB checkpoint")
        wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
        if wrong:
            raise BackboneWeightsError(f"backbone_weights {path}: {wrong[0]} has shape "
                                       f"{tuple(state[wrong[0]].shape)}, the model expects "
                                       f"{tuple(expected[wrong[0]].shape)} (another ResNet depth?)")
        self.body.load_state_dict({key: state[key] for key in expected if key in state}, strict=False)

    def freeze_stem_and_layer1(self) -> None:
        for name, parameter in self.body.named_parameters():
            if name.startswith(FROZEN_BY_UNITAB):
                parameter.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)[-1]


def sine_position_encoding(mask: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding. mask: (B, H, W) True on padding -> (B, H, W, d_model)."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * 2 * math.pi
    x = x / (x[:, :, -1:] + eps) * 2 * math.pi
    half = d_model // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)


def bin_embedding_init(num_bins: int, d_model: int) -> torch.Tensor:
    """Sine/cosine code of each bin's value (frequencies pi..pi*num_bins), scaled to the embedding init std."""
    values = torch.linspace(0, 1, num_bins)[:, None]
    frequencies = math.pi * num_bins ** (torch.arange(d_model // 2) / max(1, d_model // 2 - 1))
    code = torch.cat([(values * frequencies).sin(), (values * frequencies).cos()], dim=1)
    code = F.pad(code, (0, d_model - code.shape[1]))
    return code * (2 ** 0.5) * d_model ** -0.5


# ---------------------------------------------------------------------------------------------------------------
# The model

@dataclass
class UniTABConfig:
    """Everything needed to rebuild the network (saved as config.json next to the weights)."""

    text_vocab: int
    backbone: str = "resnet101"
    backbone_feature_level: int = -1
    backbone_norm: str = "frozen_bn"
    text_encoder: str = "roberta-base"
    text_encoder_config: dict | None = None
    d_model: int = 256
    enc_layers: int = 6
    dec_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 200
    max_decoding_step: int = 256
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.text_vocab, self.num_queries)


def build_text_encoder(config: UniTABConfig) -> RobertaModel:
    if config.text_encoder_config is not None:
        return RobertaModel(RobertaConfig(**config.text_encoder_config), add_pooling_layer=False)
    return RobertaModel.from_pretrained(config.text_encoder, add_pooling_layer=False)


@dataclass
class Memory:
    """The encoder's output for a batch: memory (B, S, d), key padding (B, S; True = ignore) and positions (B, S, d)
    that the decoder's cross-attention adds to its keys."""

    memory: torch.Tensor
    padding: torch.Tensor
    pos: torch.Tensor

    def select(self, rows: torch.Tensor) -> "Memory":
        return Memory(self.memory[rows], self.padding[rows], self.pos[rows])

    def __len__(self) -> int:
        return self.memory.shape[0]


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: positions are added to queries and keys (not values) in every layer."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_feedforward), nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src, pos, padding):
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=padding,
                                                             need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    """UniTAB's post-norm decoder layer: causal self-attention (q/k + query_pos), cross-attention to the joint memory
    (q + query_pos, k + memory pos), FFN."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_feedforward), nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, query_pos, causal, tgt_padding, memory, memory_pos, memory_padding):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=causal, key_padding_mask=tgt_padding,
                                                            need_weights=False)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + query_pos, memory + memory_pos, memory,
                                                             key_padding_mask=memory_padding,
                                                             need_weights=False)[0]))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class Transformer(nn.Module):
    def __init__(self, d: int, nheads: int, enc_layers: int, dec_layers: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.encoder_layers = nn.ModuleList(EncoderLayer(d, nheads, dim_feedforward, dropout)
                                            for _ in range(enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d, nheads, dim_feedforward, dropout)
                                            for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        for parameter in self.parameters():  # DETR/UniTAB `_reset_parameters`
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def encode(self, src, pos, padding):
        for layer in self.encoder_layers:
            src = layer(src, pos, padding)
        return src

    def decode(self, tgt, query_pos, causal, tgt_padding, memory, memory_pos, memory_padding):
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, causal, tgt_padding, memory, memory_pos, memory_padding)
        return self.decoder_norm(tgt)


class UniTAB(nn.Module):
    def __init__(self, config: UniTABConfig, backbone_weights: str | None = None,
                 text_encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        d = config.d_model
        self.layout = config.layout
        self.backbone = Backbone(config.backbone, config.backbone_feature_level, backbone_weights,
                                 config.backbone_norm)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        self.text_encoder = text_encoder if text_encoder is not None else build_text_encoder(config)
        # MDETR's FeatureResizer: Linear + LayerNorm + dropout
        self.text_proj = nn.Sequential(nn.Linear(self.text_encoder.config.hidden_size, d), nn.LayerNorm(d),
                                       nn.Dropout(config.dropout))
        self.transformer = Transformer(d, config.nheads, config.enc_layers, config.dec_layers,
                                       config.dim_feedforward, config.dropout)
        self.token_embed = nn.Embedding(self.layout.size, d)
        self.decoder_pos = nn.Embedding(config.max_decoding_step, d)
        # UniTAB's DecoderEmbeddings: LayerNorm + dropout over token + position embeddings
        self.embed_norm, self.embed_dropout = nn.LayerNorm(d), nn.Dropout(config.dropout)
        self.output = nn.Linear(d, self.layout.size, bias=False)
        self.output.weight = self.token_embed.weight  # tied, as in UniTAB
        nn.init.normal_(self.token_embed.weight, std=d ** -0.5)
        nn.init.normal_(self.decoder_pos.weight, std=0.02)
        with torch.no_grad():  # neighbouring bins start out similar, which speeds up learning coordinates
            self.token_embed.weight[self.layout.first_bin:] = bin_embedding_init(self.layout.num_bins, d)

    # -- encoder -------------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, image_mask: torch.Tensor, text_ids: torch.Tensor,
               text_mask: torch.Tensor) -> "Memory":
        """images (B,3,H,W), image_mask (B,H,W) True on padding, text_ids/text_mask (B,L) with mask 1 on real tokens.
        Returns encoder memory (B, HW+L, d), its key padding mask (True = ignore) and its positions (B, HW+L, d):
        the image's 2-D sine code, zeros for the text (UniTAB), added to queries/keys inside every layer."""
        features = self.backbone(images)
        feat_mask = F.interpolate(image_mask[:, None].float(), size=features.shape[-2:])[:, 0].bool()
        img = self.input_proj(features).flatten(2).transpose(1, 2)
        img_pos = sine_position_encoding(feat_mask, self.config.d_model).flatten(1, 2).to(img.dtype)
        text = self.text_proj(self.text_encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state)
        src = torch.cat([img, text], dim=1)
        pos = torch.cat([img_pos, torch.zeros_like(text)], dim=1)
        padding = torch.cat([feat_mask.flatten(1), text_mask == 0], dim=1)
        return Memory(self.transformer.encode(src, pos, padding), padding, pos)

    # -- decoder -------------------------------------------------------------------------------------------------
    def decode(self, memory: Memory, prev_tokens: torch.Tensor,
               token_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced causal decoding: logits (B, T, vocab) for next tokens after each of `prev_tokens` (B, T)."""
        length = prev_tokens.shape[1]
        if length > self.config.max_decoding_step:
            raise ValueError(f"decoder input of {length} tokens exceeds max_decoding_step "
                             f"{self.config.max_decoding_step}")
        query_pos = self.decoder_pos(torch.arange(length, device=prev_tokens.device))[None]
        x = self.embed_dropout(self.embed_norm(self.token_embed(prev_tokens) + query_pos))
        # boolean like the padding masks (True = may not attend)
        causal = torch.ones(length, length, dtype=torch.bool, device=prev_tokens.device).triu(1)
        hidden = self.transformer.decode(x, query_pos.to(x.dtype), causal, token_padding, memory.memory,
                                         memory.pos, memory.padding)
        return self.output(hidden)

    def forward(self, images, image_mask, text_ids, text_mask, prev_tokens, token_padding=None) -> torch.Tensor:
        return self.decode(self.encode(images, image_mask, text_ids, text_mask), prev_tokens, token_padding)

    @torch.no_grad()
    def generate(self, memory: Memory, max_steps: int | None = None,
                 prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding from <s> (or `prefix`, (B, P)) until every row emitted </s> or `max_steps` tokens total.
        Returns (B, T) token ids including the start; rows that finished early are padded with pad_token_id."""
        cfg = self.config
        max_steps = min(max_steps or cfg.max_decoding_step, cfg.max_decoding_step)
        batch, device = len(memory), memory.memory.device
        tokens = prefix if prefix is not None else torch.full((batch, 1), cfg.bos_token_id, dtype=torch.long,
                                                               device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        while tokens.shape[1] < max_steps and not finished.all():
            next_token = self.decode(memory, tokens)[:, -1].argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, cfg.pad_token_id), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= next_token == cfg.eos_token_id
        return tokens


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The single token cross-entropy of UniTAB (padding positions carry ignore_index)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)  # fp32 loss
