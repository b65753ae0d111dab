"""Released LLaMA2-Accessory directories: tensor-parallel shards, names, RoPE layout, refusals."""

import json

import pytest
import torch

from sphinx_edge.checkpoints import CheckpointError, load_model
from sphinx_edge.checkpoints.accessory import (
    from_our_names,
    merge_shards,
    split_shards,
    to_our_names,
    write_accessory,
)
from sphinx_edge.generate import build_inputs
from tests.conftest import make_image


def image_logits(model, tokenizer):
    embeds, _ = build_inputs(model, tokenizer, "What colour is the square?", make_image(80, 50))
    with torch.no_grad():
        return model(embeds)


@pytest.mark.parametrize("size", ["test-tiny", "test-1k"])
def test_two_shard_checkpoint_reproduces_logits(model_factory, tokenizer, tmp_path, size):
    model = model_factory(size, seed=7)
    write_accessory(model, tmp_path, mp=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth", "meta.json"]
    shard = torch.load(tmp_path / "consolidated.01-of-02.model.pth")["model"]
    assert shard["llma.layers.0.attention.wq.weight"].shape[0] == model.config.llm.dim // 2  # column-parallel
    assert shard["llma.tok_embeddings.weight"].shape[1] == model.config.llm.dim // 2
    assert "llma.openclip_convnext_xxl.stem.0.weight" in shard and "llma.dinov2_vitg14.pos_embed" in shard
    loaded = load_model(tmp_path, size=size)
    assert loaded.config.layout == model.config.layout
    assert torch.allclose(image_logits(loaded, tokenizer), image_logits(model, tokenizer), atol=1e-5)


def test_rope_rows_are_stored_interleaved(model_factory, tmp_path):
    """Accessory rotates (x0, x1) pairs; the stored wq must act that way on a real complex RoPE."""
    from sphinx_edge.model.llm import apply_rope, rope_cos_sin

    model = model_factory("test-tiny", seed=8)
    cfg = model.config.llm
    state = from_our_names(model.state_dict(), model.config)
    x = torch.randn(3, cfg.dim)
    pos = torch.tensor([0, 5, 11])
    wq_meta = state["llma.layers.0.attention.wq.weight"]
    q_meta = (x @ wq_meta.T).view(3, cfg.n_heads, cfg.head_dim // 2, 2)
    freqs = pos[:, None].float() / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    rotated = torch.view_as_real(torch.view_as_complex(q_meta.contiguous()) * torch.polar(torch.ones_like(freqs), freqs)[:, None])
    ours = (x @ model.llm.layers[0].attention.wqkv.weight[: cfg.dim].T).view(3, cfg.n_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    ours = apply_rope(ours.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    # Same rotation up to the pair ordering inside each head.
    half = cfg.head_dim // 2
    ours_pairs = torch.stack([ours[..., :half], ours[..., half:]], dim=-1)
    assert torch.allclose(ours_pairs, rotated, atol=1e-5)


def test_sparse_experts_merge_per_expert(model_factory):
    model = model_factory("test-moe", seed=9)
    state = from_our_names(model.state_dict(), model.config)
    n = model.config.llm.n_experts
    w2 = state["llma.layers.1.feed_forward.w2"]
    assert w2.shape == (n * model.config.llm.ffn_dim, model.config.llm.dim)  # Accessory stores w2 transposed
    shards = split_shards(state, 2, n)
    assert shards[0]["llma.layers.1.feed_forward.w1"].shape[0] == n * model.config.llm.ffn_dim // 2
    back = to_our_names(merge_shards(shards, n), model.config)
    ours = model.state_dict()
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_missing_shard_and_foreign_types_are_refused(model_factory, tmp_path):
    write_accessory(model_factory("test-tiny"), tmp_path, mp=2)
    (tmp_path / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(CheckpointError, match=r"shards \[1\] of 2 are missing"):
        load_model(tmp_path)
    write_accessory(model_factory("test-tiny"), tmp_path, mp=2)
    with pytest.raises(CheckpointError, match="is a llama model.*'test-intern2' is a internlm2"):
        load_model(tmp_path, size="test-intern2")
    with pytest.raises(CheckpointError, match="does not have the shape of size 'tiny'"):
        load_model(tmp_path, size="tiny")
    (tmp_path / "meta.json").write_text(json.dumps({"llama_type": "mixtral_sparse_ens5"}))
    with pytest.raises(CheckpointError, match="CLIP ViT-L/14 and a BLIP-2 Q-Former"):
        load_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"llama_type": "falcon"}))
    with pytest.raises(CheckpointError, match="'falcon' is not a SPHINX model"):
        load_model(tmp_path)


def test_corrupt_shard_is_refused(model_factory, tmp_path):
    write_accessory(model_factory("test-tiny"), tmp_path, mp=1)
    (tmp_path / "consolidated.00-of-01.model.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read .*consolidated.00-of-01"):
        load_model(tmp_path)
