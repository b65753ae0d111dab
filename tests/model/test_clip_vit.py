"""CLIP ViT: parity with transformers' CLIPVisionModel and nn.MultiheadAttention, open_clip names,
export, full-size parameter count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import assert_exports_at_any_view_count
from sphinx_edge.config import CLIPViTConfig, clip_vit_parameters
from sphinx_edge.model.clip_vit import CLIPViT

# 28 px views of 14 px patches: 2x2 patches + CLS.
_SMALL = CLIPViTConfig(width=32, layers=2, heads=2, patch_size=14, image_size=28, output_dim=16)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: norm scales ~1, everything else ~0.2 so every block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            parts = name.split(".")
            if len(parts) > 1 and parts[-2].startswith("ln_") and parts[-1] == "weight":
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.2 * r)


def _to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip visual names -> transformers' CLIPVisionModel names; the fused in_proj is split."""
    out = {
        "embeddings.class_embedding": state["class_embedding"],
        "embeddings.patch_embedding.weight": state["conv1.weight"],
        "embeddings.position_embedding.weight": state["positional_embedding"],
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    simple = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    simple["attn.out_proj"] = "self_attn.out_proj"
    for k, v in state.items():
        if not k.startswith("transformer.resblocks."):
            continue
        i, rest = k.split(".", 3)[2:]
        hf = f"encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):  # rows [q; k; v]
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{hf}self_attn.{name}.{kind}"] = part
        else:
            module, kind = rest.rsplit(".", 1)
            out[f"{hf}{simple[module]}.{kind}"] = v
    return out  # `proj` has no place in CLIPVisionModel (it is CLIPVisionModelWithProjection's)


def _hf_reference(model: CLIPViT) -> CLIPVisionModel:
    cfg = model.config
    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_act="quick_gelu" if cfg.quick_gelu else "gelu",
            layer_norm_eps=cfg.norm_eps,
        )
    ).eval()
    hf.load_state_dict(_to_hf(model.state_dict()), strict=True)
    return hf


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize("views", [1, 2])
def test_parity_with_transformers(quick_gelu: bool, views: int) -> None:
    cfg = dataclasses.replace(_SMALL, quick_gelu=quick_gelu)
    model = CLIPViT(cfg).eval()
    _randomize(model)
    hf = _hf_reference(model)
    x = torch.randn(views, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        # CLIPVisionModel's last_hidden_state precedes post_layernorm (it norms only the pooled
        # CLS); SPHINX norms every token, which is post_layernorm applied to all of them.
        ref = hf.post_layernorm(hf(pixel_values=x).last_hidden_state)
    assert ours.shape == (views, 1 + cfg.n_patches, cfg.width)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_attention_is_nn_multihead_attention() -> None:
    """Our attention loads into nn.MultiheadAttention (open_clip's module) strictly and agrees with
    it run sequence first, as the reference's clip_encode_image runs it (LND)."""
    model = CLIPViT(_SMALL).eval()
    _randomize(model)
    ours = model.transformer.resblocks[0].attn
    mha = nn.MultiheadAttention(_SMALL.width, _SMALL.heads).eval()
    mha.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 5, _SMALL.width)
    with torch.no_grad():
        ref = mha(*[x.transpose(0, 1)] * 3, need_weights=False)[0].transpose(0, 1)
        diff = (ours(x) - ref).abs().max().item()
    assert diff <= 1e-5, diff


def test_state_dict_names_match_open_clip() -> None:
    """The names and shapes of open_clip's ViT-L/14 visual tower (llma.clip.visual.* in a SPHINX
    checkpoint), so a stripped state dict loads strictly."""
    with torch.device("meta"):
        model = CLIPViT(CLIPViTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "conv1.weight": (1024, 3, 14, 14),
        "class_embedding": (1024,),
        "positional_embedding": (257, 1024),
        "ln_pre.weight": (1024,), "ln_pre.bias": (1024,),
        "ln_post.weight": (1024,), "ln_post.bias": (1024,),
        "proj": (1024, 768),
    }  # fmt: skip
    for i in range(24):
        b = f"transformer.resblocks.{i}."
        expected |= {
            b + "ln_1.weight": (1024,), b + "ln_1.bias": (1024,),
            b + "attn.in_proj_weight": (3072, 1024), b + "attn.in_proj_bias": (3072,),
            b + "attn.out_proj.weight": (1024, 1024), b + "attn.out_proj.bias": (1024,),
            b + "ln_2.weight": (1024,), b + "ln_2.bias": (1024,),
            b + "mlp.c_fc.weight": (4096, 1024), b + "mlp.c_fc.bias": (4096,),
            b + "mlp.c_proj.weight": (1024, 4096), b + "mlp.c_proj.bias": (1024,),
        }  # fmt: skip
    assert shapes == expected


def test_export_dynamic_views() -> None:
    model = CLIPViT(_SMALL).eval()
    _randomize(model)
    size = _SMALL.image_size
    assert_exports_at_any_view_count(model, size)


def test_full_size_parameter_count() -> None:
    cfg = CLIPViTConfig()
    with torch.device("meta"):
        model = CLIPViT(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == clip_vit_parameters(cfg) == 303_966_208  # open_clip ViT-L-14 `visual`
