"""Released SPHINX directories (LLaMA2-Accessory format, docs/ARCHITECTURE.md section 3): read, merging
tensor-parallel shards; write.

A directory holds `meta.json` ({"llama_type": ...}), `config.json` (model args),
`tokenizer.model` and `consolidated.{rank:02d}-of-{mp:02d}.model.pth` files of `{"model": state}`
with `llma.`-prefixed keys. Shards split the LLM's column-parallel weights (wq, wk, wv, w1, w3, output)
on dim 0, its row-parallel ones (wo, w2) and the embedding on dim 1; everything else is replicated:
the visual encoders, `visual_proj`, `qformer_proj` (plain nn.Linear in the reference) and the
special embeddings. Accessory's sparse Mixtral stacks experts as [E * hidden / mp, dim] for w1, w2
and w3 alike (w2 transposed), merged per expert (`_sparse_expert_merge` in mixtral_sparse_ens5.py);
its router `gate` is replicated. Accessory rotates interleaved RoPE pairs; q/k rows are permuted to
our rotate-half form.

The encoders' keys: `openclip_convnext_xxl.` (timm), `dinov2_vitg14.` (hub) and, in the four-expert
types, `clip.visual.` (open_clip; the rest of `clip.` is the text tower's leftovers, which SPHINX
never runs and we drop) and `qformer.` (transformers' Blip2Model without its language model).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sphinx_edge.checkpoints import read_json
from sphinx_edge.checkpoints.convert import (
    fuse_qkv,
    half_to_interleaved,
    interleaved_to_half,
    internlm2_wqkv_to_fused,
    split_qkv,
)
from sphinx_edge.checkpoints.lazy import LazyTensors
from sphinx_edge.checkpoints.strict import CheckpointError
from sphinx_edge.checkpoints.infer import infer_config
from sphinx_edge.config import RELEASED, SphinxConfig, get_config, released_config
from sphinx_edge.io import atomic_path, write_text_atomic

SHARD_RE = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model\.pth$")
# Accessory's encoder prefixes -> ours (after `llma.`).
ENCODER_PREFIXES = {"openclip_convnext_xxl.": "convnext.", "dinov2_vitg14.": "dinov2.", "clip.visual.": "clip.",
                    "qformer.": "qformer."}
# open_clip's text tower minus its transformer (which the reference sets to None): stored, never run.
CLIP_TEXT_LEFTOVERS = ("clip.token_embedding.", "clip.positional_embedding", "clip.ln_final.", "clip.text_projection",
                       "clip.logit_scale", "clip.attn_mask")
LLM_KEYS = ("llma.layers.", "llma.tok_embeddings.", "llma.output.")  # the only tensor-parallel ones
DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wqkv.weight",
        "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
SPARSE_EXPERTS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def is_accessory_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "meta.json").exists() or any(SHARD_RE.search(p.name) for p in path.glob("consolidated.*.pth"))


def _shard_files(path: Path) -> list[Path]:
    found = {}
    for p in path.glob("consolidated.*.model.pth"):
        m = SHARD_RE.search(p.name)
        if m:
            found[(int(m[1]), int(m[2]))] = p
    if not found:
        raise CheckpointError(f"{path} holds no consolidated.NN-of-MM.model.pth shard")
    mps = {mp for _, mp in found}
    if len(mps) != 1:
        raise CheckpointError(f"{path} mixes shards of different parallel sizes: {sorted(mps)}")
    mp = mps.pop()
    missing = [r for r in range(mp) if (r, mp) not in found]
    if missing:
        raise CheckpointError(f"{path}: shards {missing} of {mp} are missing (a partial download?)")
    return [found[(r, mp)] for r in range(mp)]


def _merge_rule(key: str, n_experts: int):
    """How shards of `key` combine: a concat dim, 'experts' or None (replicated)."""
    if not key.startswith(LLM_KEYS):
        return None
    if n_experts and key.endswith(SPARSE_EXPERTS):
        return "experts"
    if key.endswith(DIM0):
        return 0
    if key.endswith(DIM1):
        return 1
    return None


def merge_shards(shards: list[dict[str, torch.Tensor]], n_experts: int = 0) -> dict[str, torch.Tensor]:
    return {key: merge_key(key, [s[key] for s in shards], n_experts) for key in shards[0]}


def merge_key(key: str, parts: list[torch.Tensor], n_experts: int = 0) -> torch.Tensor:
    """One tensor from its tensor-parallel parts (`_merge_rule`)."""
    rule = _merge_rule(key, n_experts)
    if rule == "experts":
        return torch.cat([p.view(n_experts, -1, p.shape[-1]) for p in parts], dim=1).flatten(0, 1)
    if rule is None or len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=rule)


def split_shards(state: dict[str, torch.Tensor], mp: int, n_experts: int = 0) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, t in state.items():
        rule = _merge_rule(key, n_experts)
        if rule == "experts":
            parts = [c.flatten(0, 1) for c in t.view(n_experts, -1, t.shape[-1]).chunk(mp, dim=1)]
        elif rule is None:
            parts = [t] * mp
        else:
            parts = list(t.chunk(mp, dim=rule))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def _family(path: Path, meta: dict, size: str | None) -> str:
    """The LLM family of a llama_type we read (the registered released model of that type says)."""
    llama_type = meta.get("llama_type", "")
    released = released_config(llama_type)
    if released is None:
        raise CheckpointError(
            f"{path}: llama_type {llama_type!r} is not a SPHINX model sphinx-edge reads "
            f"(known: {', '.join(RELEASED)})"
        )
    family = released.llm.family
    if size and get_config(size).llm.family != family:
        raise CheckpointError(
            f"{path} is a {family} model ({llama_type}), but size {size!r} is a {get_config(size).llm.family} model"
        )
    return family


def _n_experts(state: dict[str, torch.Tensor]) -> int:
    """Mixtral's experts per layer (the router's rows); 0 for a dense LLM."""
    gate = state.get("llma.layers.0.feed_forward.gate.weight")
    return 0 if gate is None else gate.shape[0]


# How one of our tensors is made from Accessory's (merged) tensors: given a reader of those by key.
Recipe = Callable[[Callable[[str], torch.Tensor]], torch.Tensor]


def our_recipes(keys: Iterable[str], config: SphinxConfig) -> dict[str, Recipe]:
    """Our name -> how to make it from Accessory's keys `keys` (renamed, q/k rows permuted to our RoPE
    form and fused into wqkv, sparse experts stacked), without reading anything."""
    cfg = config.llm
    out: dict[str, Recipe] = {}
    qkv: dict[str, set[str]] = {}

    def same(key: str) -> Recipe:
        return lambda read: read(key)

    for key in keys:
        if not key.startswith("llma."):
            raise CheckpointError(f"unexpected key {key!r}: LLaMA2-Accessory keys start with 'llma.'")
        name = key[len("llma."):]
        enc = next((p for p in ENCODER_PREFIXES if name.startswith(p)), None)
        if enc:
            out[ENCODER_PREFIXES[enc] + name[len(enc):]] = same(key)
        elif name.startswith(CLIP_TEXT_LEFTOVERS):
            continue
        elif name.startswith(("visual_proj.", "qformer_proj.", "start_img", "end_img", "skip")):
            out[name] = same(key)
        elif m := re.match(r"layers\.(\d+)\.attention\.(wq|wk|wv)\.weight$", name):
            qkv.setdefault(m[1], set()).add(m[2])
        elif name.endswith("attention.wqkv.weight"):
            out["llm." + name] = lambda read, key=key: internlm2_wqkv_to_fused(read(key), cfg)
        elif cfg.n_experts and name.endswith(SPARSE_EXPERTS):
            def experts(read, key=key):  # noqa: ANN001, ANN202
                t = read(key).view(cfg.n_experts, -1, cfg.dim)  # [E, hidden, dim]
                return t.transpose(1, 2).contiguous() if key.endswith("w2") else t
            out["llm." + name] = experts
        else:
            out["llm." + name] = same(key)
    for layer, parts in qkv.items():
        if parts != {"wq", "wk", "wv"}:
            raise CheckpointError(f"layer {layer} lacks attention weights {sorted({'wq', 'wk', 'wv'} - parts)}")

        def fused(read, prefix=f"llma.layers.{layer}.attention."):  # noqa: ANN001, ANN202
            q = interleaved_to_half(read(prefix + "wq.weight"), cfg.n_heads)
            k = interleaved_to_half(read(prefix + "wk.weight"), cfg.n_kv_heads)
            return fuse_qkv(q, k, read(prefix + "wv.weight"))
        out[f"llm.layers.{layer}.attention.wqkv.weight"] = fused
    return out


def to_our_names(state: dict[str, torch.Tensor], config: SphinxConfig) -> dict[str, torch.Tensor]:
    return {name: make(state.__getitem__) for name, make in our_recipes(state, config).items()}


def from_our_names(state: dict[str, torch.Tensor], config: SphinxConfig) -> dict[str, torch.Tensor]:
    cfg = config.llm
    inverse = {v: k for k, v in ENCODER_PREFIXES.items()}
    out = {}
    for key, t in state.items():
        enc = next((p for p in inverse if key.startswith(p)), None)
        if enc:
            out["llma." + inverse[enc] + key[len(enc):]] = t
        elif not key.startswith("llm."):
            out["llma." + key] = t
        elif key.endswith("attention.wqkv.weight"):
            prefix = "llma." + key[len("llm."):-len("wqkv.weight")]
            q, k, v = split_qkv(t, cfg)
            out[prefix + "wq.weight"] = half_to_interleaved(q, cfg.n_heads)
            out[prefix + "wk.weight"] = half_to_interleaved(k, cfg.n_kv_heads)
            out[prefix + "wv.weight"] = v
        elif cfg.n_experts and key.endswith(SPARSE_EXPERTS):
            experts = t.transpose(1, 2) if key.endswith("w2") else t
            out["llma." + key[len("llm."):]] = experts.reshape(-1, cfg.dim).contiguous()
        else:
            out["llma." + key[len("llm."):]] = t
    return out


def open_accessory(path: str | os.PathLike, size: str | None = None) -> tuple[SphinxConfig, LazyTensors]:
    """Config and tensors (in our names, read on demand) of a released SPHINX directory. The shards are
    memory-mapped: a tensor is read, and merged across shards, only when it is asked for."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{path} has no meta.json: not a LLaMA2-Accessory checkpoint directory")
    meta = read_json(path / "meta.json")
    args = read_json(path / "config.json") if (path / "config.json").exists() else {}
    if not isinstance(meta, dict) or not isinstance(args, dict):
        raise CheckpointError(f"{path}: meta.json and config.json must each hold a JSON object")
    shards, files = [], _shard_files(path)
    for file in files:
        try:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
        if not isinstance(shard, dict) or not isinstance(shard.get("model"), dict):
            raise CheckpointError(f"{file} does not hold {{'model': state_dict}}")
        shards.append(shard["model"])
    family = _family(path, meta, size)
    n_experts = _n_experts(shards[0])
    missing = [(i, k) for i, s in enumerate(shards[1:], 1) for k in shards[0] if k not in s]
    if missing:
        raise CheckpointError(f"{path}: shard {missing[0][0]} lacks {missing[0][1]!r} (and {len(missing) - 1} more)")
    merged_meta = {k: merge_key(k, [s[k].to("meta") for s in shards], n_experts) for k in shards[0]}
    try:
        config = infer_config(merged_meta, args, meta["llama_type"], family, size)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    recipes = our_recipes(merged_meta, config)

    def read(key: str) -> torch.Tensor:
        return merge_key(key, [s[key] for s in shards], n_experts)

    return config, LazyTensors({name: (lambda make=make: make(read)) for name, make in recipes.items()},
                               {name: make(merged_meta.__getitem__) for name, make in recipes.items()}, str(path), files)


def write_accessory(model, path: str | os.PathLike, mp: int = 1) -> None:
    """Writes a model as a LLaMA2-Accessory directory with `mp` tensor-parallel shards."""
    config: SphinxConfig = model.config
    path = Path(path)
    cfg = config.llm
    state = from_our_names({k: v.detach() for k, v in model.state_dict().items()}, config)
    for rank, shard in enumerate(split_shards(state, mp, cfg.n_experts)):
        with atomic_path(path / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth") as tmp:
            torch.save({"model": shard}, tmp)
    args = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "max_seq_len": cfg.max_seq_len}
    write_text_atomic(path / "config.json", json.dumps(args, indent=2))
    write_text_atomic(path / "meta.json", json.dumps({"llama_type": config.llama_type}))
