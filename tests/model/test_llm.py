"""LLM parity against transformers (same random weights, fp32) and KV-cache consistency."""

import pytest
import torch

from sphinx_edge.checkpoints.convert import fused_to_internlm2_wqkv, internlm2_wqkv_to_fused
from sphinx_edge.checkpoints.hf import llm_state_from_hf
from sphinx_edge.config import get_config
from sphinx_edge.model.llm import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs diff of hidden states and logits, fp32


def hf_model(size: str):
    cfg = get_config(size).llm
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    if cfg.family == "mixtral":
        hf_cfg = transformers.MixtralConfig(
            num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok, **common
        )
        model = transformers.MixtralForCausalLM(hf_cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # norms away from 1 so that their weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, model.eval()


def hf_on_disk_state(model, tmp_path) -> dict[str, torch.Tensor]:
    """The tensors as transformers writes them to disk (the layout released checkpoints use)."""
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path)
    return load_file(str(tmp_path / "model.safetensors"))


def ours_from(cfg, state) -> Transformer:
    model = Transformer(cfg)
    model.load_state_dict(llm_state_from_hf(dict(state), cfg), strict=True)
    return model.eval()


@pytest.mark.parametrize("size", ["test-tiny", "test-plus", "test-moe"])
def test_hidden_states_and_logits_match_transformers(size, tmp_path):
    cfg, ref = hf_model(size)
    ours = ours_from(cfg, hf_on_disk_state(ref, tmp_path))
    embeds = torch.randn(2, 37, cfg.dim)
    with torch.no_grad():
        ref_out = ref(inputs_embeds=embeds, output_hidden_states=True)
        hidden = ours.hidden(embeds)
        logits = ours(embeds)
    assert (hidden - ref_out.hidden_states[-1]).abs().max() <= TOL
    assert (logits - ref_out.logits).abs().max() <= TOL


def test_internlm2_grouped_wqkv_matches_llama(tmp_path):
    """InternLM2 is LLaMA with one fused wqkv grouped per kv head; check the regrouping end to end."""
    cfg, ref = hf_model("test-tiny")
    llama_state = hf_on_disk_state(ref, tmp_path)
    intern_cfg = get_config("test-intern2").llm.__class__(**{**cfg.__dict__, "family": "internlm2"})
    intern_state = {
        "model.tok_embeddings.weight": llama_state["model.embed_tokens.weight"],
        "model.norm.weight": llama_state["model.norm.weight"],
        "output.weight": llama_state["lm_head.weight"],
    }
    hd, g = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        s, d = f"model.layers.{i}.", f"model.layers.{i}."
        q = llama_state[s + "self_attn.q_proj.weight"].view(cfg.n_kv_heads, g, hd, cfg.dim)
        k = llama_state[s + "self_attn.k_proj.weight"].view(cfg.n_kv_heads, 1, hd, cfg.dim)
        v = llama_state[s + "self_attn.v_proj.weight"].view(cfg.n_kv_heads, 1, hd, cfg.dim)
        intern_state[d + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, cfg.dim)
        intern_state[d + "attention.wo.weight"] = llama_state[s + "self_attn.o_proj.weight"]
        intern_state[d + "attention_norm.weight"] = llama_state[s + "input_layernorm.weight"]
        intern_state[d + "ffn_norm.weight"] = llama_state[s + "post_attention_layernorm.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            intern_state[f"{d}feed_forward.{ours}.weight"] = llama_state[f"{s}mlp.{theirs}.weight"]
    ours = ours_from(intern_cfg, intern_state)
    embeds = torch.randn(1, 21, cfg.dim)
    with torch.no_grad():
        assert (ours(embeds) - ref(inputs_embeds=embeds).logits).abs().max() <= TOL
    w = intern_state["model.layers.0.attention.wqkv.weight"]
    assert torch.equal(fused_to_internlm2_wqkv(internlm2_wqkv_to_fused(w, intern_cfg), intern_cfg), w)


@pytest.mark.parametrize("size", ["test-tiny", "test-intern2", "test-plus", "test-moe"])
def test_kv_cache_decoding_matches_full_forward(size):
    cfg = get_config(size).llm
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    embeds = torch.randn(1, 24, cfg.dim)
    with torch.no_grad():
        full = model(embeds)
        model.setup_caches(max_seq_len=64)
        prefill = model(embeds[:, :16], torch.arange(16))
        steps = [model(embeds[:, t : t + 1], torch.tensor([t])) for t in range(16, 24)]
        last = model(embeds[:, :1], torch.tensor([0]), last_logits_only=True)  # overwrite position 0
    assert (prefill - full[:, :16]).abs().max() <= TOL
    assert (torch.cat(steps, dim=1) - full[:, 16:]).abs().max() <= TOL
    assert last.shape == (1, 1, cfg.vocab_size)


def test_moe_routes_to_top_k_experts_only():
    cfg = get_config("test-moe").llm
    torch.manual_seed(2)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ff = model.layers[0].feed_forward
    x = torch.randn(5, cfg.dim)
    with torch.no_grad():
        probs = ff.gate(x).softmax(-1)
        top = probs.topk(cfg.n_experts_per_tok).indices
        expected = torch.stack([
            sum(probs[n, e] / probs[n, top[n]].sum() * ff._expert(e, x[n : n + 1])[0] for e in top[n].tolist())
            for n in range(5)
        ])
        assert (ff(x) - expected).abs().max() <= 1e-5
