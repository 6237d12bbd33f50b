"""UniTAB's --load (issue 14): an MDETR/UniTAB checkpoint initialises the backbone, input_proj, text encoder, resizer
and transformer where names map and shapes match; what is skipped is reported with its reason; a checkpoint that
fits nothing is one error naming the file. The MDETR-format checkpoint is built here with MDETR's own module layout
(ashkamath/mdetr models/{mdetr,transformer,backbone}.py) at small sizes; nothing is downloaded."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torchvision
from torch import nn
from transformers import RobertaConfig, RobertaModel
from vlflow.stages.unitab.model import CheckpointError, UniTAB, UniTABConfig, load_checkpoint

torch.set_num_threads(1)

D, HEADS, FFN, VOCAB, TEXT = 32, 2, 64, 60, 48


class MdetrEncoderLayer(nn.Module):
    def __init__(self, ffn=FFN):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS)
        self.linear1, self.linear2 = nn.Linear(D, ffn), nn.Linear(ffn, D)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)


class MdetrDecoderLayer(nn.Module):
    def __init__(self, ffn=FFN):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS)
        self.cross_attn_image = nn.MultiheadAttention(D, HEADS)
        self.linear1, self.linear2 = nn.Linear(D, ffn), nn.Linear(ffn, D)
        self.norm1, self.norm3, self.norm4 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)


class Mdetr(nn.Module):
    """MDETR's parameter names: backbone = Joiner(Backbone, position) -> backbone.0.body.*, transformer.{encoder,
    decoder}.layers.N.*, transformer.decoder.norm, transformer.text_encoder (RobertaModel with its pooler),
    transformer.resizer.{fc,layer_norm}, and the detection heads UniTAB has no use for."""

    def __init__(self, layers=2, ffn=FFN):
        super().__init__()
        trunk = torchvision.models.resnet18()
        del trunk.fc
        joiner = nn.Module()
        joiner.body = trunk
        self.backbone = nn.ModuleList([joiner])
        self.input_proj = nn.Conv2d(512, D, kernel_size=1)
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(MdetrEncoderLayer(ffn) for _ in range(layers))
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(MdetrDecoderLayer(ffn) for _ in range(layers))
        self.transformer.decoder.norm = nn.LayerNorm(D)
        self.transformer.text_encoder = RobertaModel(RobertaConfig(
            vocab_size=VOCAB, hidden_size=TEXT, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40, pad_token_id=1))
        self.transformer.resizer = nn.Module()
        self.transformer.resizer.fc = nn.Linear(TEXT, D)
        self.transformer.resizer.layer_norm = nn.LayerNorm(D)
        self.query_embed = nn.Embedding(100, D)
        self.class_embed = nn.Linear(D, 256)
        self.bbox_embed = nn.Linear(D, 4)
        with torch.no_grad():  # distinct values everywhere, so a tensor loaded from the wrong name would show
            for name, tensor in self.state_dict().items():
                if name.endswith("running_var"):
                    tensor.uniform_(0.5, 1.5)
                elif tensor.is_floating_point() and (name.endswith(("running_mean", ".bias"))
                                                     or not name.startswith("backbone.")):
                    tensor.normal_(0, 0.1)  # the trunk's conv weights keep torchvision's init (finite outputs)


def ours(**overrides) -> UniTAB:
    fields = dict(text_vocab=VOCAB, backbone="resnet18", backbone_norm="frozen_bn", d_model=D, enc_layers=2,
                  dec_layers=2, nheads=HEADS, dim_feedforward=FFN, dropout=0.0, num_queries=8, max_decoding_step=16,
                  text_encoder_config=dict(vocab_size=VOCAB, hidden_size=TEXT, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                                           pad_token_id=1))
    fields.update(overrides)
    torch.manual_seed(0)
    return UniTAB(UniTABConfig(**fields))


def save(tmp_path, state, name="mdetr.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_mdetr_checkpoint_initialises_the_transformer_and_reports_the_rest(tmp_path):
    torch.manual_seed(1)
    mdetr = Mdetr()
    theirs = mdetr.state_dict()
    model = ours()
    report = load_checkpoint(model, str(save(tmp_path, {"model": theirs, "epoch": 7})))
    mine = model.state_dict()
    pairs = {  # our name -> MDETR's, written out by hand
        "backbone.body.layer3.1.conv2.weight": "backbone.0.body.layer3.1.conv2.weight",
        "backbone.body.bn1.running_var": "backbone.0.body.bn1.running_var",
        "input_proj.weight": "input_proj.weight",
        "transformer.encoder_layers.1.self_attn.in_proj_weight":
            "transformer.encoder.layers.1.self_attn.in_proj_weight",
        "transformer.encoder_layers.0.norm2.bias": "transformer.encoder.layers.0.norm2.bias",
        "transformer.decoder_layers.1.cross_attn.out_proj.weight":
            "transformer.decoder.layers.1.cross_attn_image.out_proj.weight",
        "transformer.decoder_layers.0.norm2.weight": "transformer.decoder.layers.0.norm3.weight",
        "transformer.decoder_layers.0.norm3.bias": "transformer.decoder.layers.0.norm4.bias",
        "transformer.decoder_layers.1.linear1.weight": "transformer.decoder.layers.1.linear1.weight",
        "transformer.decoder_norm.weight": "transformer.decoder.norm.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight":
            "transformer.text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_proj.0.weight": "transformer.resizer.fc.weight",
        "text_proj.1.bias": "transformer.resizer.layer_norm.bias",
    }
    for our_name, their_name in pairs.items():
        torch.testing.assert_close(mine[our_name], theirs[their_name], rtol=0, atol=0, msg=our_name)
        assert report.loaded[their_name] == our_name
    # every backbone/transformer/text tensor came from the file; only UniTAB's own decoder embeddings did not
    assert report.covers("backbone.") and report.covers("transformer.") and report.covers("text_encoder.")
    assert sorted(report.not_initialised) == ["decoder_pos.weight", "embed_norm.bias", "embed_norm.weight",
                                              "token_embed.weight"]
    assert report.skipped["query_embed.weight"] == "no such tensor in this model"
    assert report.skipped["class_embed.weight"] == "no such tensor in this model"
    assert report.skipped["transformer.text_encoder.pooler.dense.weight"] == "no such tensor in this model"
    assert len(report.loaded) + len(report.skipped) == len(theirs)
    # the loaded model runs
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    logits = model(images, mask, torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long),
                   torch.tensor([[0, 7]]))
    assert logits.shape == (1, 2, model.layout.size) and torch.isfinite(logits).all()


def test_shapes_that_differ_are_skipped_with_the_reason_and_ema_weights_are_preferred(tmp_path):
    torch.manual_seed(2)
    mdetr, ema = Mdetr(layers=3, ffn=128), Mdetr(layers=3, ffn=128)  # wider FFN and a third layer than ours
    model = ours()
    report = load_checkpoint(model, str(save(tmp_path, {"model": mdetr.state_dict(),
                                                        "model_ema": ema.state_dict()})))
    assert report.skipped["transformer.encoder.layers.0.linear1.weight"] == (
        "shape (128, 32), ours (transformer.encoder_layers.0.linear1.weight) is (64, 32)")
    assert report.skipped["transformer.encoder.layers.2.norm1.weight"] == "no such tensor in this model"
    assert "transformer.encoder_layers.0.linear1.weight" in report.not_initialised
    # as UniTAB's --load: a checkpoint's model_ema wins over its model
    torch.testing.assert_close(model.state_dict()["transformer.encoder_layers.0.norm1.weight"],
                               ema.state_dict()["transformer.encoder.layers.0.norm1.weight"], rtol=0, atol=0)


def test_unitab_checkpoint_also_initialises_the_decoder_embeddings_and_the_tied_output(tmp_path):
    torch.manual_seed(3)
    state = Mdetr().state_dict()
    size = VOCAB + 2 + 8
    state |= {"transformer.embedding.word_embeddings.weight": torch.randn(size, D),
              "transformer.embedding.position_embeddings.weight": torch.randn(16, D),
              "transformer.embedding.LayerNorm.weight": torch.rand(D),
              "transformer.embedding.LayerNorm.bias": torch.rand(D)}
    model = ours()
    report = load_checkpoint(model, str(save(tmp_path, {"model": state})))
    assert report.not_initialised == []
    torch.testing.assert_close(model.output.weight, state["transformer.embedding.word_embeddings.weight"],
                               rtol=0, atol=0)


def test_a_checkpoint_that_fits_nothing_is_one_error_naming_the_file(tmp_path):
    path = save(tmp_path, {"model": {"encoder.weight": torch.zeros(2)}}, "other.pth")
    with pytest.raises(CheckpointError, match=rf"init_checkpoint {path}: none of its 1 tensors fits this model"):
        load_checkpoint(ours(), str(path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"no checkpoint")
    with pytest.raises(CheckpointError, match=rf"init_checkpoint {garbage}: cannot read"):
        load_checkpoint(ours(), str(garbage))


def test_pretrain_logs_what_it_loaded_and_refuses_a_partial_frozen_backbone(tmp_path, caplog):
    from vlflow.stages.unitab.spec import PretrainParams
    from vlflow.stages.unitab.train import initialise_from_checkpoint

    from vlflow.errors import StageError
    from vlflow.stage import StageContext

    full = save(tmp_path, {"model": Mdetr().state_dict()})
    params = PretrainParams(init_checkpoint=str(full), backbone="resnet18")  # frozen BN allowed: the file has it
    ctx = StageContext(stage="pretrain", params=params, inputs={}, output_dir=tmp_path / "out",
                       log=logging.getLogger("test.init"))
    with caplog.at_level(logging.INFO, logger="test.init"):
        summary = initialise_from_checkpoint(ctx, ours(), params)
    assert summary["not_initialised"] == 4 and summary["loaded"] > 100
    assert "skipped transformer.text_encoder.pooler.dense.weight: no such tensor in this model" in caplog.text
    assert "not in the checkpoint, keeps its initialisation: token_embed.weight" in caplog.text
    written = json.loads((tmp_path / "out" / "init_checkpoint.json").read_text())
    assert written["loaded"]["transformer.decoder.layers.1.norm4.weight"] == "transformer.decoder_layers.1.norm3.weight"

    no_backbone = {k: v for k, v in Mdetr().state_dict().items() if not k.startswith("backbone.")}
    partial = save(tmp_path, {"model": no_backbone}, "transformer_only.pth")
    params = PretrainParams(init_checkpoint=str(partial), backbone="resnet18")
    with pytest.raises(StageError, match="does not hold the whole backbone"):
        initialise_from_checkpoint(ctx, ours(), params)
    with pytest.raises(ValueError, match="not both"):
        PretrainParams(init_checkpoint=str(full), backbone_weights=str(full))
