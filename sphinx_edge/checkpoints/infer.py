"""What a released checkpoint's files say about its model: the configuration read from meta.json,
config.json and the tensor shapes, so that a directory loads without being told its size.

Shapes give the LLM's width, depth, KV heads, FFN width and vocabulary, both encoders' widths and
depths, DINOv2's patch size, FFN kind and stored position grid, and the layout (a `skip` embedding
exists only in SPHINX-X models). What shapes cannot give comes from a registered size with the same
shapes, else from the released models' values: the view sides (ConvNeXt 512 px, DINOv2 224 px) and
DINOv2's head count (64-wide heads, as every released DINOv2 ViT has). docs/ARCHITECTURE.md,
section 3, lists the rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from sphinx_edge.checkpoints.strict import CheckpointError
from sphinx_edge.config import SIZES, ConvNeXtConfig, DINOv2Config, LLMConfig, SphinxConfig

DINOV2_HEAD_DIM = 64
CUSTOM = "custom"  # the name of a configuration that matches no registered size

# Fields a checkpoint's shapes cannot show; they never make two configurations differ.
_UNSEEN = {"llm": ("max_seq_len",), "convnext": ("image_size",), "dinov2": ("image_size", "n_heads")}


def _count(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the checkpoint's {pattern!r} blocks are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _tensor(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise CheckpointError(f"the checkpoint lacks {key!r}")
    return state[key]


def llm_shape(state: Mapping[str, Any], args: Mapping[str, Any], family: str, defaults: LLMConfig) -> LLMConfig:
    """The LLM of an Accessory state (`llma.` keys) and its config.json arguments."""
    vocab, dim = _tensor(state, "llma.tok_embeddings.weight").shape
    n_layers = _count(state, r"llma\.layers\.(\d+)\.")
    n_heads = int(args.get("n_heads", defaults.n_heads))
    head_dim = dim // n_heads
    if "llma.layers.0.attention.wk.weight" in state:
        n_kv_heads = state["llma.layers.0.attention.wk.weight"].shape[0] // head_dim
    else:  # InternLM2's fused wqkv: [(heads + 2 * kv heads) * head_dim, dim]
        rows = _tensor(state, "llma.layers.0.attention.wqkv.weight").shape[0]
        n_kv_heads = (rows // head_dim - n_heads) // 2
    w1 = _tensor(state, "llma.layers.0.feed_forward.w1.weight")
    return dataclasses.replace(
        defaults, family=family, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        ffn_dim=w1.shape[0], vocab_size=vocab, norm_eps=float(args.get("norm_eps", defaults.norm_eps)),
        rope_theta=float(args.get("rope_theta", defaults.rope_theta)),
        max_seq_len=int(args.get("max_seq_len", defaults.max_seq_len)))


def convnext_shape(state: Mapping[str, Any], prefix: str = "llma.openclip_convnext_xxl.") -> ConvNeXtConfig:
    depths, dims = [], []
    for i in range(_count(state, re.escape(prefix) + r"stages\.(\d+)\.")):
        depths.append(_count(state, re.escape(prefix) + rf"stages\.{i}\.blocks\.(\d+)\."))
        dims.append(_tensor(state, f"{prefix}stages.{i}.blocks.0.conv_dw.weight").shape[0])
    hidden = _tensor(state, f"{prefix}stages.0.blocks.0.mlp.fc1.weight").shape[0]
    return ConvNeXtConfig(depths=tuple(depths), dims=tuple(dims), mlp_ratio=hidden // dims[0])


def dinov2_shape(state: Mapping[str, Any], prefix: str = "llma.dinov2_vitg14.") -> DINOv2Config:
    embed_dim = _tensor(state, f"{prefix}cls_token").shape[-1]
    positions = _tensor(state, f"{prefix}pos_embed").shape[1] - 1
    swiglu = f"{prefix}blocks.0.mlp.w12.weight" in state
    hidden = _tensor(state, f"{prefix}blocks.0.mlp.{'w3' if swiglu else 'fc2'}.weight").shape[1]
    config = DINOv2Config(
        embed_dim=embed_dim, depth=_count(state, re.escape(prefix) + r"blocks\.(\d+)\."),
        n_heads=max(embed_dim // DINOV2_HEAD_DIM, 1), patch_size=_tensor(state, f"{prefix}patch_embed.proj.weight").shape[-1],
        ffn="swiglu" if swiglu else "mlp", mlp_ratio=4.0 if swiglu else hidden / embed_dim,
        pos_grid=math.isqrt(positions))
    if config.ffn_hidden != hidden:
        raise CheckpointError(f"DINOv2's SwiGLU FFN is {hidden} wide, which no mlp_ratio gives (ViT-g: 4096 for 1536)")
    return config


def shape_differences(found: SphinxConfig, expected: SphinxConfig) -> list[str]:
    """'section.field: checkpoint X, size Y' for every field the checkpoint's shapes decide."""
    diffs = []
    for section in ("llm", "convnext", "dinov2"):
        a, b = getattr(found, section), getattr(expected, section)
        diffs += [f"{section}.{f.name}: checkpoint {getattr(a, f.name)}, size {getattr(b, f.name)}"
                  for f in dataclasses.fields(a)
                  if f.name not in _UNSEEN[section] and getattr(a, f.name) != getattr(b, f.name)]
    return diffs


def infer_config(state: Mapping[str, Any], args: Mapping[str, Any], llama_type: str, family: str,
                 size: str | None = None) -> SphinxConfig:
    """The configuration of an Accessory state. With `size`, the shapes must be that size's (the
    error names every field that differs); without, the registered size with these shapes is taken,
    else a configuration named `custom` with the released models' view sides."""
    candidates = [SIZES[size]] if size else [c for c in SIZES.values() if c.llama_type == llama_type]
    defaults = candidates[0].llm if candidates else LLMConfig(family, 1, 1, 1, 1, 1, 1)
    layout = "sphinx-x" if "llma.skip" in state else "sphinx-1k"
    found = SphinxConfig(CUSTOM, llm_shape(state, args, family, defaults), convnext_shape(state), dinov2_shape(state),
                         layout=layout, llama_type=llama_type)
    for c in candidates:
        if not shape_differences(found, c):
            return dataclasses.replace(c, llm=dataclasses.replace(c.llm, max_seq_len=found.llm.max_seq_len),
                                       layout=layout)
    if size:
        raise CheckpointError(f"the checkpoint does not have the shape of size {size!r}:\n  "
                              + "\n  ".join(shape_differences(found, SIZES[size])))
    # Encoders of a registered size keep its view sides and DINOv2 heads.
    for c in SIZES.values():
        if not shape_differences(dataclasses.replace(found, llm=c.llm), c):
            return dataclasses.replace(found, convnext=c.convnext, dinov2=c.dinov2)
    return found
