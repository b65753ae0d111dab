"""Assembling a SPHINX model from released parts: an HF LLM directory and the encoders' files."""

import pytest
import torch

from sphinx_edge.checkpoints import CheckpointError
from sphinx_edge.checkpoints.hf import assemble_from_parts, read_encoder, read_hf_llm
from sphinx_edge.config import get_config

transformers = pytest.importorskip("transformers")


def hf_llama_dir(tmp_path, size="test-tiny", **overrides):
    cfg = get_config(size).llm
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    model.save_pretrained(tmp_path / "llm")
    return model, tmp_path / "llm"


def test_model_assembled_from_parts_uses_each_part(model_factory, tmp_path):
    hf, llm_dir = hf_llama_dir(tmp_path)
    donor = model_factory("test-tiny", seed=11)
    torch.save(donor.dinov2.state_dict(), tmp_path / "dinov2_vitg14.pth")  # the hub's file layout
    # open_clip writes the whole CLIP model; the ConvNeXt is its visual trunk (+ a classifier to drop).
    clip = {f"visual.trunk.{k}": v for k, v in donor.convnext.state_dict().items()}
    clip["visual.trunk.head.fc.weight"] = torch.zeros(3, 32)
    clip["text_projection"] = torch.zeros(4, 4)
    torch.save({"state_dict": clip}, tmp_path / "open_clip.bin")

    model = assemble_from_parts(get_config("test-tiny"), llm=llm_dir, dinov2=tmp_path / "dinov2_vitg14.pth",
                                convnext=tmp_path / "open_clip.bin").eval()
    embeds = torch.randn(1, 7, 32)
    with torch.no_grad():
        assert (model(embeds) - hf(inputs_embeds=embeds).logits).abs().max() <= 1e-4
        pixels = torch.randn(2, 3, 64, 64)
        assert torch.equal(model.convnext(pixels), donor.convnext(pixels))
        pixels = torch.randn(2, 3, 28, 28)
        assert torch.equal(model.dinov2(pixels), donor.dinov2(pixels))


def test_llm_of_another_family_or_shape_is_refused(tmp_path):
    _, llm_dir = hf_llama_dir(tmp_path)
    with pytest.raises(CheckpointError, match="is a llama model, but this size needs a mixtral model"):
        read_hf_llm(llm_dir, get_config("test-moe").llm)
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2 vs model 22"):
        read_hf_llm(llm_dir, get_config("tiny").llm)


def test_incomplete_llm_and_encoder_files_are_refused(tmp_path, model_factory):
    from safetensors.torch import load_file, save_file

    _, llm_dir = hf_llama_dir(tmp_path)
    state = load_file(str(llm_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(llm_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        read_hf_llm(llm_dir, get_config("test-tiny").llm)
    partial = dict(model_factory("test-tiny").dinov2.state_dict())
    partial.pop("norm.weight")
    torch.save(partial, tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match=r"(?s)DINOv2 weights .* missing keys \(1\):\n    norm.weight"):
        assemble_from_parts(get_config("test-tiny"), dinov2=tmp_path / "dino.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read weights from .*empty.pth"):
        read_encoder(tmp_path / "empty.pth", "convnext")


def test_four_expert_sizes_are_not_assembled_from_parts():
    with pytest.raises(CheckpointError, match="'test-ens5' also has CLIP ViT-L/14 and a BLIP-2 Q-Former"):
        assemble_from_parts(get_config("test-ens5"))
