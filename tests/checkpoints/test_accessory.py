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
    with pytest.raises(CheckpointError, match="a Mixtral one, but it has no experts' router"):
        load_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"llama_type": "llama_ens10"}))
    with pytest.raises(CheckpointError, match="'llama_ens10' is not a SPHINX model sphinx-edge reads"):
        load_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"llama_type": "falcon"}))
    with pytest.raises(CheckpointError, match="'falcon' is not a SPHINX model"):
        load_model(tmp_path)


def test_corrupt_shard_is_refused(model_factory, tmp_path):
    write_accessory(model_factory("test-tiny"), tmp_path, mp=1)
    (tmp_path / "consolidated.00-of-01.model.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read .*consolidated.00-of-01"):
        load_model(tmp_path)


# --- The four-expert types (+ CLIP ViT-L/14 and BLIP-2's Q-Former) -----------------------------------

FOUR_EXPERTS = {"test-ens": "llama_ens", "test-ens5": "llama_ens5", "test-sparse-ens": "mixtral_sparse_ens",
                "test-sparse-ens5": "mixtral_sparse_ens5"}


def write_released(model, path, mp: int = 2) -> None:
    """`model` in LLaMA2-Accessory's layout with `mp` tensor-parallel shards, each also holding what the
    reference's `clip` keeps of open_clip's text tower (its transformer is set to None there)."""
    write_accessory(model, path, mp=mp)
    leftovers = {"llma.clip.token_embedding.weight": torch.randn(10, 8),
                 "llma.clip.positional_embedding": torch.randn(5, 8), "llma.clip.ln_final.weight": torch.ones(8),
                 "llma.clip.ln_final.bias": torch.zeros(8), "llma.clip.text_projection": torch.randn(8, 4),
                 "llma.clip.logit_scale": torch.tensor(4.6)}
    for rank in range(mp):
        file = path / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth"
        shard = torch.load(file)
        shard["model"].update(leftovers)
        torch.save(shard, file)


@pytest.mark.parametrize("size", list(FOUR_EXPERTS))
def test_four_expert_checkpoint_loads_without_a_size_and_reproduces_logits(model_factory, tokenizer, tmp_path, size):
    model = model_factory(size, seed=11)
    cfg = model.config
    assert cfg.llama_type == FOUR_EXPERTS[size] and cfg.clip is not None and cfg.qformer is not None
    write_released(model, tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text()) == {"llama_type": FOUR_EXPERTS[size]}
    shard = torch.load(tmp_path / "consolidated.01-of-02.model.pth")["model"]
    # Accessory's names; the encoders, both projectors and the special embeddings are replicated.
    dim = cfg.llm.dim
    assert shard["llma.clip.visual.conv1.weight"].shape == model.clip.conv1.weight.shape
    assert shard["llma.qformer.query_tokens"].shape == (1, cfg.qformer.n_queries, cfg.qformer.qformer_dim)
    assert "llma.qformer.qformer.encoder.layer.0.crossattention.attention.key.weight" in shard
    assert "llma.qformer.vision_model.embeddings.patch_embedding.weight" in shard
    assert shard["llma.qformer_proj.0.weight"].shape == (dim, cfg.qformer.qformer_dim)
    assert shard["llma.visual_proj.0.weight"].shape == (dim, cfg.vision_dim)
    assert shard["llma.layers.0.attention.wq.weight"].shape[0] == dim // 2
    if cfg.llm.n_experts:  # per expert, half of each expert's hidden rows
        assert shard["llma.layers.0.feed_forward.w1"].shape[0] == cfg.llm.n_experts * cfg.llm.ffn_dim // 2
    loaded = load_model(tmp_path)  # no --size: everything from the files
    assert loaded.config == cfg
    ours, theirs = image_logits(loaded, tokenizer), image_logits(model, tokenizer)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(loaded.state_dict()["clip.proj"], model.state_dict()["clip.proj"])


def test_four_expert_size_checks(model_factory, tmp_path):
    """--size is a check: the other four-expert kind of the same shapes is refused by its llama_type
    (its views differ), a two-expert size by its experts."""
    write_released(model_factory("test-ens"), tmp_path)
    assert load_model(tmp_path, size="test-ens").config.name == "test-ens"
    with pytest.raises(CheckpointError, match="llama_type: checkpoint llama_ens, size llama_ens5"):
        load_model(tmp_path, size="test-ens5")
    with pytest.raises(CheckpointError, match=r"clip: checkpoint has one, size none"):
        load_model(tmp_path, size="test-tiny")
    with pytest.raises(CheckpointError, match=r"is a llama model \(llama_ens\), but size 'test-sparse-ens'"):
        load_model(tmp_path, size="test-sparse-ens")


def test_a_two_expert_mixtral_reads_back(model_factory, tokenizer, tmp_path):
    """A Mixtral with the light ensemble is written as mixtral_sparse_ens5 and read by its tensors."""
    model = model_factory("test-moe", seed=12)
    write_accessory(model, tmp_path, mp=2)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    torch.testing.assert_close(image_logits(loaded, tokenizer), image_logits(model, tokenizer), atol=1e-5, rtol=0)


def test_convert_info_and_chat_on_a_four_expert_checkpoint(model_factory, tokenizer_file, tmp_path):
    import shutil

    from tests.test_cli import run

    write_released(model_factory("test-ens5", seed=13), tmp_path / "released")
    shutil.copy(tokenizer_file, tmp_path / "released" / "tokenizer.model")
    code, out = run("convert", tmp_path / "released", "--out", tmp_path / "ours")
    assert code == 0 and "test-ens5 (llama_ens5" in out, out
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())["config"]
    assert saved["clip"]["quick_gelu"] is True and saved["qformer"]["n_queries"] == 4
    assert saved["convnext"]["input_size"] == 32 and saved["convnext"]["token_upsample"] == 2
    make_image(100, 50).save(tmp_path / "img.png")
    for checkpoint in ("released", "ours"):
        code, out = run("chat", "What colour is the square?", "--checkpoint", tmp_path / checkpoint,
                        "--image", tmp_path / "img.png", "--max-new-tokens", "3")
        assert code == 0 and "prompt tokens" in out, out
    code, out = run("info", "--size", "sphinx-1k")
    assert code == 0 and "291 per view, 1455" in out and "5632" in out, out
    code, out = run("info", "--size", "moe-512")
    assert code == 0 and "291 per view, 291" in out, out
