"""ConvNeXt trunk: parity with transformers' ConvNextModel, export, full-size parameter count."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import ConvNextConfig as HFConvNextConfig
from transformers import ConvNextModel

from conftest import assert_exports_at_any_view_count
from sphinx_edge.config import _TEST_CONVNEXT, ConvNeXtConfig
from sphinx_edge.model.convnext import ConvNeXt, nearest_resize

# Our (timm) names -> transformers names.
_TO_HF = [
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.stages.\1.layers.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.stages.\1.layers.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
]


def _to_hf(name: str) -> str:
    for pattern, repl in _TO_HF:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(name)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: norm scales ~1, layer scales ~0.5 so every block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * r)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.2 * r)


def _hf_reference(model: ConvNeXt) -> ConvNextModel:
    cfg = model.config
    hf = ConvNextModel(
        HFConvNextConfig(
            depths=list(cfg.depths),
            hidden_sizes=list(cfg.dims),
            layer_norm_eps=cfg.norm_eps,
            hidden_act="gelu",
            layer_scale_init_value=1e-6,
        )
    ).eval()
    # transformers hard-codes eps=1e-6 in the stem, downsample and block norms; timm's
    # convnext_xxlarge uses norm_eps=1e-5 everywhere.
    for m in hf.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = cfg.norm_eps
    state = {_to_hf(k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("views", [1, 2])
def test_parity_with_transformers(views: int) -> None:
    model = ConvNeXt(_TEST_CONVNEXT).eval()
    _randomize(model)
    hf = _hf_reference(model)
    size = _TEST_CONVNEXT.image_size
    x = torch.randn(views, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        fmap = hf(pixel_values=x).last_hidden_state  # [N, C, h, w], before any final norm
        tokens = hf.layernorm(fmap.permute(0, 2, 3, 1)).flatten(1, 2)  # per position, row-major
        ref = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    side = size // 32
    assert ours.shape == (views, 1 + side * side, _TEST_CONVNEXT.out_dim)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5, diff


def test_state_dict_names_match_timm() -> None:
    names = set(ConvNeXt(_TEST_CONVNEXT).state_dict())
    assert not any(n.startswith("stages.0.downsample") for n in names)
    assert {
        "stem.0.weight", "stem.1.bias", "stages.1.downsample.0.weight", "stages.1.downsample.1.weight",
        "stages.2.blocks.1.conv_dw.bias", "stages.2.blocks.1.norm.weight", "stages.2.blocks.1.mlp.fc1.weight",
        "stages.2.blocks.1.mlp.fc2.bias", "stages.2.blocks.1.gamma", "head.norm.weight", "head.norm.bias",
    } <= names  # fmt: skip


def test_export_dynamic_views() -> None:
    model = ConvNeXt(_TEST_CONVNEXT).eval()
    _randomize(model)
    size = _TEST_CONVNEXT.image_size
    assert_exports_at_any_view_count(model, size)


def _count(depths: tuple[int, ...], dims: tuple[int, ...], ratio: int) -> int:
    """Parameter count of the trunk (no classifier) from the architecture."""
    total = 3 * dims[0] * 16 + dims[0] + 2 * dims[0]  # stem conv 4x4 + LayerNorm2d
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i:  # LayerNorm2d + conv 2x2
            total += 2 * dims[i - 1] + dims[i - 1] * c * 4 + c
        # dwconv 7x7 + bias, norm, fc1, fc2, gamma
        total += depth * (49 * c + c + 2 * c + (c * ratio * c + ratio * c) + (ratio * c * c + c) + c)
    return total + 2 * dims[-1]  # head.norm


def test_full_size_parameter_count() -> None:
    cfg = ConvNeXtConfig()
    with torch.device("meta"):
        model = ConvNeXt(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == _count(cfg.depths, cfg.dims, cfg.mlp_ratio) == 843_398_016
    # timm's model cards quote convnext_xxlarge with its classifier fc (3072 * classes + classes):
    # 846.5M for the ImageNet-1k head, 879.7M for the ImageNet-12k one (11821 classes).
    assert round((n + 3073 * 1000) / 1e6, 1) == 846.5
    assert round((n + 3073 * 11821) / 1e6, 1) == 879.7


@pytest.mark.parametrize("size,side", [(28, 32), (224, 256), (512, 512), (56, 64), (30, 32), (9, 5)])
def test_nearest_resize_is_torchs_and_exact_in_onnx(size: int, side: int) -> None:
    """The four-expert views' resize (224 -> 256 px; 28 -> 32 at test scale) picks torch's pixels, and
    onnxruntime runs the exported graph to the same pixels (its own nearest Resize is one pixel off
    at 28 -> 32)."""
    import onnxruntime as ort

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    want = torch.nn.functional.interpolate(x, size=(side, side), mode="nearest")
    assert torch.equal(nearest_resize(x, side), want)

    class Resize(nn.Module):
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return nearest_resize(v, side)

    program = torch.onnx.export(Resize(), (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    assert (session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] == want.numpy()).all()
