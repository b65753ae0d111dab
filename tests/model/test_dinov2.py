"""DINOv2 ViT: parity with transformers' Dinov2Model, pos-embed resize rule, export, param count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config as HFDinov2Config
from transformers import Dinov2Model

from conftest import assert_exports_at_any_view_count
from sphinx_edge.config import _TEST_DINOV2, DINOv2Config
from sphinx_edge.model.dinov2 import DINOv2

# pos_grid equals the 2x2 patch grid of a 28 px view: transformers then uses the stored embeddings
# as is, so parity does not depend on its resize (size=..., unlike DINOv2's scale_factor rule).
_PARITY = DINOv2Config(embed_dim=24, depth=2, n_heads=2, pos_grid=2, image_size=28)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: norm scales ~1, layer scales ~0.5 so every block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * r)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.2 * r)


def _to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (hub) names -> transformers 5.x names; fused qkv / w12 are split."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for k, v in state.items():
        if k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        if not k.startswith("blocks."):
            continue
        _, i, rest = k.split(".", 2)
        hf = f"encoder.layer.{i}."
        kind = rest.rsplit(".", 1)[1]  # weight / bias / gamma
        if rest.startswith(("norm1.", "norm2.", "mlp.fc1.", "mlp.fc2.")):
            out[hf + rest] = v
        elif rest.startswith("attn.qkv."):  # rows [q; k; v]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{hf}attention.{name}.{kind}"] = part
        elif rest.startswith("attn.proj."):
            out[f"{hf}attention.o_proj.{kind}"] = v
        elif rest.startswith("mlp.w12."):  # rows [x1 (gated by silu); x2]
            gate, up = v.chunk(2, dim=0)
            out[f"{hf}mlp.gate_proj.{kind}"], out[f"{hf}mlp.up_proj.{kind}"] = gate, up
        elif rest.startswith("mlp.w3."):
            out[f"{hf}mlp.down_proj.{kind}"] = v
        elif rest.startswith(("ls1.", "ls2.")):
            out[f"{hf}layer_scale{rest[2]}.lambda1"] = v
        else:
            raise KeyError(k)
    return out


def _hf_reference(model: DINOv2, image_size: int) -> Dinov2Model:
    cfg = model.config
    hf = Dinov2Model(
        HFDinov2Config(
            hidden_size=cfg.embed_dim,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.n_heads,
            mlp_ratio=int(cfg.mlp_ratio),  # transformers types it as int
            patch_size=cfg.patch_size,
            image_size=image_size,  # sets transformers' stored grid: image_size // patch_size
            layerscale_value=1.0,
            layer_norm_eps=cfg.norm_eps,
            qkv_bias=True,
            use_swiglu_ffn=cfg.ffn == "swiglu",
            hidden_act="gelu",
        )
    ).eval()
    return hf


@pytest.mark.parametrize("ffn", ["swiglu", "mlp"])
@pytest.mark.parametrize("views", [1, 2])
def test_parity_with_transformers(ffn: str, views: int) -> None:
    cfg = dataclasses.replace(_PARITY, ffn=ffn)
    model = DINOv2(cfg).eval()
    _randomize(model)
    hf = _hf_reference(model, cfg.pos_grid * cfg.patch_size)
    hf.load_state_dict(_to_hf(model.state_dict()), strict=True)
    x = torch.randn(views, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(x), hf(pixel_values=x).last_hidden_state
    assert ours.shape == (views, 1 + cfg.n_patches, cfg.embed_dim)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5, diff


def test_pos_embed_resize_rule() -> None:
    """pos_grid 3 -> 2x2 patches: scale_factor (2 + 0.1) / 3, not size=(2, 2)."""
    model = DINOv2(_TEST_DINOV2).eval()
    _randomize(model)
    d = _TEST_DINOV2.embed_dim
    grid = model.pos_embed[:, 1:].reshape(1, 3, 3, d).permute(0, 3, 1, 2)
    with torch.no_grad():
        pos = model.interpolate_pos_encoding(28, 28)
        rule = F.interpolate(grid, scale_factor=(2.1 / 3, 2.1 / 3), mode="bicubic", antialias=False)
        by_size = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=False)
    flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
    assert pos.shape == (1, 5, d)
    torch.testing.assert_close(pos[:, :1], model.pos_embed[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(pos[:, 1:], flat(rule), rtol=0, atol=0)
    # Why the rule matters: the scale factor moves PyTorch's sampling positions.
    assert (pos[:, 1:] - flat(by_size)).abs().max() > 1e-2

    # End to end: transformers fed the embeddings resized by our rule (its grid is then 2x2, used
    # as is) agrees with our model resizing its 3x3 grid inside forward.
    hf = _hf_reference(model, 28)
    state = _to_hf(model.state_dict())
    state["embeddings.position_embeddings"] = pos
    hf.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        diff = (model(x) - hf(pixel_values=x).last_hidden_state).abs().max().item()
    assert diff <= 1e-5, diff


def test_pos_embed_resize_is_height_width_ordered() -> None:
    model = DINOv2(_TEST_DINOV2)
    grid = model.pos_embed[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        pos = model.interpolate_pos_encoding(28, 42)  # 2 x 3 patches
        ref = F.interpolate(grid, scale_factor=(2.1 / 3, 3.1 / 3), mode="bicubic", antialias=False)
    torch.testing.assert_close(pos[:, 1:], ref.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert model(torch.randn(1, 3, 28, 42)).shape == (1, 7, _TEST_DINOV2.embed_dim)


def test_stored_grid_is_used_as_is() -> None:
    model = DINOv2(_PARITY)
    assert model.interpolate_pos_encoding(28, 28) is model.pos_embed


@pytest.mark.parametrize("cfg", [_TEST_DINOV2, _PARITY], ids=["resized", "stored"])
def test_export_dynamic_views(cfg: DINOv2Config) -> None:
    model = DINOv2(cfg).eval()
    _randomize(model)
    size = cfg.image_size
    assert_exports_at_any_view_count(model, size)


def _count(c: DINOv2Config) -> int:
    """Parameter count from the architecture (hub model: no registers, mask_token included)."""
    d, h, p = c.embed_dim, c.ffn_hidden, c.patch_size
    ffn = (d * 2 * h + 2 * h) + (h * d + d) if c.ffn == "swiglu" else (d * h + h) + (h * d + d)
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + d + 2 * d + ffn + d
    embed = (3 * p * p * d + d) + d + (1 + c.pos_grid**2) * d + d  # patch, cls, pos, mask
    return embed + c.depth * block + 2 * d


def test_full_size_parameter_count() -> None:
    cfg = DINOv2Config()
    assert cfg.ffn_hidden == 4096
    with torch.device("meta"):
        model = DINOv2(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == _count(cfg) == 1_136_480_768  # hub dinov2_vitg14
