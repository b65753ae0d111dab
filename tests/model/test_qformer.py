"""BLIP-2 vision model + Q-Former: parity with transformers' Blip2Model, its names, export,
full-size names, shapes and parameter count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import Blip2Config as HFBlip2Config
from transformers import Blip2Model, Blip2QFormerModel, Blip2VisionModel

from conftest import assert_exports_at_any_view_count
from sphinx_edge.config import QFormerConfig, qformer_parameters
from sphinx_edge.model.qformer import QFormer

# 28 px views: 2x2 patches + CLS. Three Q-Former layers with cross-attention every 2nd layer
# (layers 0 and 2), so both kinds of layer are exercised; the widths differ so that a mix-up of
# vision and Q-Former widths cannot go unnoticed.
_SMALL = QFormerConfig(
    vision_dim=32, vision_layers=2, vision_heads=2, vision_mlp=64, image_size=28,
    qformer_dim=24, qformer_layers=3, qformer_heads=2, qformer_mlp=48, n_queries=4,
)  # fmt: skip


# Blip2Model always builds its language model (which SPHINX drops): keep it tiny.
_TINY_OPT = {
    "model_type": "opt", "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "vocab_size": 64, "word_embed_proj_dim": 16,
}  # fmt: skip


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: norm scales ~1, everything else ~0.2 so every block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.2 * r)


def _hf_config(cfg: QFormerConfig) -> HFBlip2Config:
    return HFBlip2Config(
        vision_config={
            "hidden_size": cfg.vision_dim,
            "intermediate_size": cfg.vision_mlp,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "layer_norm_eps": cfg.vision_norm_eps,
            "qkv_bias": True,
        },
        qformer_config={
            "hidden_size": cfg.qformer_dim,
            "intermediate_size": cfg.qformer_mlp,
            "num_hidden_layers": cfg.qformer_layers,
            "num_attention_heads": cfg.qformer_heads,
            "cross_attention_frequency": cfg.cross_attention_every,
            "encoder_hidden_size": cfg.vision_dim,
            "layer_norm_eps": cfg.qformer_norm_eps,
        },
        text_config=_TINY_OPT,
        num_query_tokens=cfg.n_queries,
    )


def _hf_reference(model: QFormer) -> Blip2Model:
    hf = Blip2Model(_hf_config(model.config)).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    # Same names: all of ours load, and only the language side (dropped by SPHINX) is left over.
    assert result.unexpected_keys == []
    assert all(k.startswith(("language_model.", "language_projection.")) for k in result.missing_keys)
    return hf


@pytest.mark.parametrize("every", [2, 1])
@pytest.mark.parametrize("views", [1, 2])
def test_parity_with_transformers(every: int, views: int) -> None:
    cfg = dataclasses.replace(_SMALL, cross_attention_every=every)
    model = QFormer(cfg).eval()
    _randomize(model)
    hf = _hf_reference(model)
    x = torch.randn(views, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = hf.get_qformer_features(pixel_values=x)  # what the reference feeds to qformer_proj
        ref = getattr(ref, "last_hidden_state", ref)  # a tensor in transformers 5, an output before
        image = hf.vision_model(pixel_values=x).last_hidden_state
        image_diff = (model.vision_model(x) - image).abs().max().item()
    assert ours.shape == (views, cfg.n_queries, cfg.qformer_dim)
    assert image_diff <= 1e-4, image_diff
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_cross_attention_layers() -> None:
    model = QFormer(_SMALL)
    assert [layer.crossattention is not None for layer in model.qformer.encoder.layer] == [True, False, True]
    names = set(model.state_dict())
    assert "qformer.encoder.layer.1.crossattention.attention.key.weight" not in names
    assert model.qformer.encoder.layer[0].crossattention.attention.key.weight.shape == (24, 32)


def test_export_dynamic_views() -> None:
    model = QFormer(_SMALL).eval()
    _randomize(model)
    size = _SMALL.image_size
    assert_exports_at_any_view_count(model, size)


def test_full_size_names_shapes_and_count() -> None:
    """At the released size (transformers' Blip2Config defaults = blip2-opt-2.7b), names and shapes
    equal those of Blip2Model's vision_model, query_tokens and qformer: strict loading works."""
    hf_cfg = HFBlip2Config()
    cfg = QFormerConfig()
    with torch.device("meta"):
        ours = QFormer(cfg)
        vision = Blip2VisionModel(hf_cfg.vision_config)
        qformer = Blip2QFormerModel(hf_cfg.qformer_config)
    theirs = {f"vision_model.{k}": v.shape for k, v in vision.state_dict().items()}
    theirs |= {f"qformer.{k}": v.shape for k, v in qformer.state_dict().items()}
    theirs["query_tokens"] = torch.Size([1, hf_cfg.num_query_tokens, hf_cfg.qformer_config.hidden_size])
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    n = sum(p.numel() for p in ours.parameters())
    assert n == qformer_parameters(cfg) == 985_952_256 + 24_576 + 105_137_664
