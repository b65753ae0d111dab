"""What a released checkpoint's files say about its model: the configuration read from meta.json,
config.json and the tensor shapes, so that a directory loads without being told its size.

Shapes give the LLM's width, depth, KV heads, FFN width, experts and vocabulary, every encoder's
widths and depths, DINOv2's patch size, FFN kind and stored position grid, CLIP's and the Q-Former's
view side (their position tables are not resized), which experts there are (`clip.visual.` and
`qformer.` tensors make a four-expert model) and the layout (a `skip` embedding exists only in
SPHINX-X models). What shapes cannot give comes from a registered size of the same llama_type with
the same shapes, else from the released model of that llama_type (config.RELEASED): the views
(canvas grid, ConvNeXt view side and how it is read, DINOv2's side), attention heads (64-wide in
DINOv2, CLIP and the Q-Former, 88-wide in EVA ViT-g, as the released encoders), CLIP's activation
and the LLM arguments config.json leaves out. docs/ARCHITECTURE.md, section 3, lists the rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from sphinx_edge.checkpoints.strict import CheckpointError
from sphinx_edge.config import (
    SIZES,
    CLIPViTConfig,
    ConvNeXtConfig,
    DINOv2Config,
    LLMConfig,
    QFormerConfig,
    SphinxConfig,
    released_config,
)

DINOV2_HEAD_DIM = 64
CUSTOM = "custom"  # the name of a configuration that matches no registered size
SECTIONS = ("llm", "clip", "convnext", "dinov2", "qformer")  # None where a model has no such expert
ENCODERS = SECTIONS[1:]

# Fields a checkpoint's shapes cannot show; they never make two configurations differ.
_UNSEEN = {"llm": ("max_seq_len",), "convnext": ("image_size", "input_size", "token_upsample"),
           "dinov2": ("image_size", "n_heads"), "clip": ("heads", "quick_gelu"),
           "qformer": ("vision_heads", "qformer_heads")}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the tensors say, section by section (the fields in _UNSEEN hold defaults)."""

    llm: LLMConfig
    convnext: ConvNeXtConfig
    dinov2: DINOv2Config
    clip: CLIPViTConfig | None
    qformer: QFormerConfig | None
    layout: str


def _count(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the checkpoint's {pattern!r} blocks are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _tensor(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise CheckpointError(f"the checkpoint lacks {key!r}")
    return state[key]


def _heads(width: int, head_dim: int) -> int:
    """Heads of `head_dim` channels, the released encoders' head width; 1 where that does not divide."""
    return width // head_dim if width >= head_dim and width % head_dim == 0 else 1


def llm_shape(state: Mapping[str, Any], args: Mapping[str, Any], family: str, defaults: LLMConfig) -> LLMConfig:
    """The LLM of an Accessory state (`llma.` keys, shards merged) and its config.json arguments."""
    vocab, dim = _tensor(state, "llma.tok_embeddings.weight").shape
    n_layers = _count(state, r"llma\.layers\.(\d+)\.")
    n_heads = int(args.get("n_heads", defaults.n_heads))
    head_dim = dim // n_heads
    if "llma.layers.0.attention.wk.weight" in state:
        n_kv_heads = state["llma.layers.0.attention.wk.weight"].shape[0] // head_dim
    else:  # InternLM2's fused wqkv: [(heads + 2 * kv heads) * head_dim, dim]
        rows = _tensor(state, "llma.layers.0.attention.wqkv.weight").shape[0]
        n_kv_heads = (rows // head_dim - n_heads) // 2
    n_experts, top_k = 0, defaults.n_experts_per_tok
    if family == "mixtral":  # w1 stacks the experts: [E * hidden, dim]; the router has E rows
        if "llma.layers.0.feed_forward.gate.weight" not in state:
            raise CheckpointError("its llama_type is a Mixtral one, but it has no experts' router "
                                  "('llma.layers.0.feed_forward.gate.weight')")
        n_experts = state["llma.layers.0.feed_forward.gate.weight"].shape[0]
        ffn_dim = _tensor(state, "llma.layers.0.feed_forward.w1").shape[0] // n_experts
        top_k = int((args.get("moe") or {}).get("num_experts_per_tok", top_k))
    else:
        ffn_dim = _tensor(state, "llma.layers.0.feed_forward.w1.weight").shape[0]
    return dataclasses.replace(
        defaults, family=family, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        ffn_dim=ffn_dim, vocab_size=vocab, norm_eps=float(args.get("norm_eps", defaults.norm_eps)),
        rope_theta=float(args.get("rope_theta", defaults.rope_theta)),
        max_seq_len=int(args.get("max_seq_len", defaults.max_seq_len)), n_experts=n_experts,
        n_experts_per_tok=top_k)


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


def clip_shape(state: Mapping[str, Any], prefix: str = "llma.clip.visual.") -> CLIPViTConfig | None:
    """CLIP ViT (open_clip names); None if the checkpoint has none. The view side is that of the
    position table (the reference adds it as is)."""
    if f"{prefix}class_embedding" not in state:
        return None
    width = state[f"{prefix}class_embedding"].shape[-1]
    patch = _tensor(state, f"{prefix}conv1.weight").shape[-1]
    positions = _tensor(state, f"{prefix}positional_embedding").shape[0] - 1
    hidden = _tensor(state, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    return CLIPViTConfig(
        width=width, layers=_count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."),
        heads=_heads(width, CLIPViTConfig().width // CLIPViTConfig().heads), patch_size=patch,
        image_size=math.isqrt(positions) * patch, mlp_ratio=hidden / width,
        output_dim=_tensor(state, f"{prefix}proj").shape[-1])


def qformer_shape(state: Mapping[str, Any], prefix: str = "llma.qformer.") -> QFormerConfig | None:
    """BLIP-2's vision model + Q-Former (transformers' names); None if the checkpoint has none."""
    if f"{prefix}query_tokens" not in state:
        return None
    vision = f"{prefix}vision_model."
    layer = f"{prefix}qformer.encoder.layer."
    vision_dim = _tensor(state, f"{vision}embeddings.class_embedding").shape[-1]
    patch = _tensor(state, f"{vision}embeddings.patch_embedding.weight").shape[-1]
    positions = _tensor(state, f"{vision}embeddings.position_embedding").shape[1] - 1
    _, n_queries, qformer_dim = state[f"{prefix}query_tokens"].shape
    n_layers = _count(state, re.escape(layer) + r"(\d+)\.")
    cross = [i for i in range(n_layers) if f"{layer}{i}.crossattention.attention.query.weight" in state]
    every = cross[1] - cross[0] if len(cross) > 1 else max(n_layers, QFormerConfig().cross_attention_every)
    if not cross or cross != list(range(0, n_layers, every)):
        raise CheckpointError(f"the Q-Former's cross-attention layers {cross} are not every k-th from layer 0")
    default = QFormerConfig()
    return QFormerConfig(
        vision_dim=vision_dim, vision_layers=_count(state, re.escape(vision) + r"encoder\.layers\.(\d+)\."),
        vision_heads=_heads(vision_dim, default.vision_dim // default.vision_heads),
        vision_mlp=_tensor(state, f"{vision}encoder.layers.0.mlp.fc1.weight").shape[0], patch_size=patch,
        image_size=math.isqrt(positions) * patch, qformer_dim=qformer_dim, qformer_layers=n_layers,
        qformer_heads=_heads(qformer_dim, default.qformer_dim // default.qformer_heads),
        qformer_mlp=_tensor(state, f"{layer}0.intermediate_query.dense.weight").shape[0],
        cross_attention_every=every, n_queries=n_queries)


def _section_differences(section: str, a: Any, b: Any) -> list[str]:
    if a is None or b is None:
        return [] if a is b else [f"{section}: checkpoint {'none' if a is None else 'has one'}, "
                                  f"size {'none' if b is None else 'has one'}"]
    return [f"{section}.{f.name}: checkpoint {getattr(a, f.name)}, size {getattr(b, f.name)}"
            for f in dataclasses.fields(a)
            if f.name not in _UNSEEN[section] and getattr(a, f.name) != getattr(b, f.name)]


def shape_differences(found: Shapes | SphinxConfig, expected: SphinxConfig, sections=SECTIONS) -> list[str]:
    """'section.field: checkpoint X, size Y' for every field the checkpoint's shapes decide."""
    return [d for s in sections for d in _section_differences(s, getattr(found, s), getattr(expected, s))]


def infer_config(state: Mapping[str, Any], args: Mapping[str, Any], llama_type: str, family: str,
                 size: str | None = None) -> SphinxConfig:
    """The configuration of an Accessory state. With `size`, the shapes (and llama_type, which fixes
    the views) must be that size's (the error names every field that differs); without, the registered
    size of this llama_type with these shapes is taken, else a configuration named `custom` with the
    views and heads of the released model of this llama_type."""
    released = released_config(llama_type)
    candidates = [SIZES[size]] if size else [c for c in SIZES.values() if c.llama_type == llama_type]
    model = SIZES[size] if size else released or (candidates[0] if candidates else None)  # for config.json's gaps
    defaults = model.llm if model else LLMConfig(family, 1, 1, 1, 1, 1, 1)
    found = Shapes(llm_shape(state, args, family, defaults), convnext_shape(state), dinov2_shape(state),
                   clip_shape(state), qformer_shape(state), "sphinx-x" if "llma.skip" in state else "sphinx-1k")
    for c in candidates:
        if not shape_differences(found, c) and c.llama_type == llama_type:
            return dataclasses.replace(c, llm=dataclasses.replace(c.llm, max_seq_len=found.llm.max_seq_len),
                                       layout=found.layout)
    if size:
        diffs = shape_differences(found, SIZES[size])
        if SIZES[size].llama_type != llama_type:  # same shapes, other views
            diffs.insert(0, f"llama_type: checkpoint {llama_type}, size {SIZES[size].llama_type}")
        raise CheckpointError(f"the checkpoint does not have the shape of size {size!r}:\n  "
                              + "\n  ".join(diffs))
    return _custom(found, llama_type, released)


def _custom(found: Shapes, llama_type: str, released: SphinxConfig | None) -> SphinxConfig:
    """A configuration of no registered size: the encoders of a registered size of the same llama_type
    keep that size's views and heads; otherwise the released model of the llama_type gives them."""
    encoders = {s: getattr(found, s) for s in ENCODERS}
    grid = released.grid if released else 2
    for c in SIZES.values():
        if c.llama_type == llama_type and not shape_differences(found, c, ENCODERS):
            encoders, grid = {s: getattr(c, s) for s in ENCODERS}, c.grid
            break
    else:
        if released is not None:
            view = {f: getattr(released.convnext, f) for f in _UNSEEN["convnext"]}
            encoders["convnext"] = dataclasses.replace(found.convnext, **view)
            # DINOv2 shares the view of CLIP and the Q-Former, whose side the shapes show.
            side = next((e.image_size for e in (found.clip, found.qformer) if e is not None),
                        released.dinov2.image_size)
            encoders["dinov2"] = dataclasses.replace(found.dinov2, image_size=side)
            if found.clip is not None and released.clip is not None:
                encoders["clip"] = dataclasses.replace(found.clip, quick_gelu=released.clip.quick_gelu)
    try:
        return SphinxConfig(CUSTOM, found.llm, layout=found.layout, grid=grid, llama_type=llama_type, **encoders)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's experts do not fit the views of a {llama_type!r} model ({e}); "
                              "no registered size has its shapes") from None
