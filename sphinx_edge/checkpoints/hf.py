"""Parts from their own releases: Hugging Face LLM backbones and the encoders' weight files.

LLMs: LlamaForCausalLM, MixtralForCausalLM (on-disk layout `block_sparse_moe.experts.E.wN`) and
InternLM2ForCausalLM (remote-code layout: fused, per-kv-group `wqkv`). All three store q/k in the
rotate-half RoPE form that our model uses. Encoders: DINOv2 torch-hub `.pth` files (our names are
the hub's) and timm / open_clip ConvNeXt files (open_clip's `visual.trunk.` prefix is stripped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sphinx_edge.checkpoints.convert import fuse_qkv, internlm2_wqkv_to_fused
from sphinx_edge.checkpoints import read_json
from sphinx_edge.checkpoints.strict import CheckpointError, load_strict
from sphinx_edge.config import LLMConfig, SphinxConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "InternLM2ForCausalLM": "internlm2",
}


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors / .pth / .bin file, or of a directory of (index-sharded) ones."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).exists():
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
                return {k: v for shard in shards for k, v in read_tensors(path / shard).items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                return read_tensors(path / single)
        raise CheckpointError(f"{path} holds no model.safetensors or pytorch_model.bin (nor an index of shards)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt, truncated or foreign files: say which file and why
        raise CheckpointError(f"cannot read weights from {path}: {e}") from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def read_hf_config(path: str | os.PathLike) -> dict:
    file = Path(path) / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    return read_json(file)


def hf_family(hf_config: dict, source: str) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise CheckpointError(f"{source}: architecture {archs or '(none)'} is not one of {', '.join(ARCHITECTURES)}")


def llm_config_from_hf(hf_config: dict, max_seq_len: int = 4096) -> LLMConfig:
    family = hf_family(hf_config, "config.json")
    n_heads = hf_config["num_attention_heads"]
    return LLMConfig(
        family=family,
        dim=hf_config["hidden_size"],
        n_layers=hf_config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
        ffn_dim=hf_config["intermediate_size"],
        vocab_size=hf_config["vocab_size"],
        rope_theta=float(hf_config.get("rope_theta") or (hf_config.get("rope_parameters") or {}).get("rope_theta", 1e4)),
        norm_eps=hf_config.get("rms_norm_eps", 1e-5),
        max_seq_len=max_seq_len,
        n_experts=hf_config.get("num_local_experts", 0) if family == "mixtral" else 0,
        n_experts_per_tok=hf_config.get("num_experts_per_tok", 2),
    )


def check_llm_config(expected: LLMConfig, found: LLMConfig, source: str) -> None:
    if found.family != expected.family:
        raise CheckpointError(f"{source} is a {found.family} model, but this size needs a {expected.family} model")
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "n_experts")
    diffs = [f"{f}: checkpoint {getattr(found, f)} vs model {getattr(expected, f)}" for f in fields
             if getattr(found, f) != getattr(expected, f)]
    if diffs:
        raise CheckpointError(f"{source} has another shape than this size:\n  " + "\n  ".join(diffs))


def llm_state_from_hf(state: dict[str, torch.Tensor], cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """HF tensor names -> our Transformer's names (unprefixed)."""
    intern = cfg.family == "internlm2"
    p = "model."
    out = {
        "tok_embeddings.weight": state.pop(p + ("tok_embeddings" if intern else "embed_tokens") + ".weight"),
        "norm.weight": state.pop(p + "norm.weight"),
        "output.weight": state.pop("output.weight" if intern else "lm_head.weight"),
    }
    for i in range(cfg.n_layers):
        src, dst = f"{p}layers.{i}.", f"layers.{i}."
        if intern:
            out[dst + "attention.wqkv.weight"] = internlm2_wqkv_to_fused(state.pop(src + "attention.wqkv.weight"), cfg)
            out[dst + "attention.wo.weight"] = state.pop(src + "attention.wo.weight")
            for k in ("attention_norm", "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
                out[f"{dst}{k}.weight"] = state.pop(f"{src}{k}.weight")
            continue
        q, k, v = (state.pop(f"{src}self_attn.{n}_proj.weight") for n in "qkv")
        out[dst + "attention.wqkv.weight"] = fuse_qkv(q, k, v)
        out[dst + "attention.wo.weight"] = state.pop(src + "self_attn.o_proj.weight")
        out[dst + "attention_norm.weight"] = state.pop(src + "input_layernorm.weight")
        out[dst + "ffn_norm.weight"] = state.pop(src + "post_attention_layernorm.weight")
        if cfg.family == "mixtral":
            moe = src + "block_sparse_moe."
            out[dst + "feed_forward.gate.weight"] = state.pop(moe + "gate.weight")
            for w in ("w1", "w2", "w3"):
                experts = [state.pop(f"{moe}experts.{e}.{w}.weight") for e in range(cfg.n_experts)]
                out[f"{dst}feed_forward.{w}"] = torch.stack(experts)
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out[f"{dst}feed_forward.{ours}.weight"] = state.pop(f"{src}mlp.{theirs}.weight")
    # Rotary caches some exports carry are derived, not weights.
    leftover = sorted(k for k in state if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise CheckpointError("unexpected keys in the LLM checkpoint:\n  " + "\n  ".join(leftover[:20]))
    return out


def read_hf_llm(path: str | os.PathLike, expected: LLMConfig | None = None) -> tuple[LLMConfig, dict[str, torch.Tensor]]:
    """Reads an HF LLM directory; returns its config and the tensors in our names."""
    source = str(path)
    found = llm_config_from_hf(read_hf_config(path), expected.max_seq_len if expected else 4096)
    if expected is not None:
        check_llm_config(expected, found, source)
    state = dict(read_tensors(path))
    try:
        return found, llm_state_from_hf(state, found)
    except KeyError as e:
        raise CheckpointError(f"{source} lacks tensor {e.args[0]}") from None


def read_encoder(path: str | os.PathLike, kind: str) -> dict[str, torch.Tensor]:
    """Tensors of a released DINOv2 (hub) or timm / open_clip ConvNeXt file, in our encoder's names."""
    state = read_tensors(path)
    if kind == "convnext":
        for prefix in ("visual.trunk.", "trunk."):  # open_clip full model, open_clip visual tower
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        # The classifier is not part of SPHINX's feature extractor (pooling and fc are removed).
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    return state


def assemble_from_parts(
    config: SphinxConfig,
    *,
    llm: str | os.PathLike | None = None,
    dinov2: str | os.PathLike | None = None,
    convnext: str | os.PathLike | None = None,
    seed: int = 0,
):
    """A SphinxModel from released parts; the projector and special embeddings start fresh."""
    from sphinx_edge.model.sphinx import build_model

    if config.clip is not None or config.qformer is not None:
        raise CheckpointError(f"size {config.name!r} also has CLIP ViT-L/14 and a BLIP-2 Q-Former, which are not "
                              "assembled from parts: convert a released LLaMA2-Accessory directory of it instead")

    model = build_model(config, seed=seed)
    if llm is not None:
        _, state = read_hf_llm(llm, config.llm)
        load_strict(model.llm, state, f"LLM checkpoint {llm}")
    if dinov2 is not None:
        load_strict(model.dinov2, read_encoder(dinov2, "dinov2"), f"DINOv2 weights {dinov2}")
    if convnext is not None:
        load_strict(model.convnext, read_encoder(convnext, "convnext"), f"ConvNeXt weights {convnext}")
    return model
