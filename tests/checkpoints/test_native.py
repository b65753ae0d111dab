"""Our own format: round trip, and refusal of incomplete or corrupt directories."""

import json

import pytest
import torch

from sphinx_edge.checkpoints import CheckpointError, load_model, tokenizer_path
from sphinx_edge.checkpoints.native import save_native


def logits(model, seed=0):
    torch.manual_seed(seed)
    embeds = torch.randn(1, 9, model.config.llm.dim)
    with torch.no_grad():
        return model(embeds)


def test_round_trip_reproduces_the_model(model_factory, tokenizer_file, tmp_path):
    model = model_factory("test-moe", seed=5)
    save_native(model, tmp_path / "ckpt", tokenizer=tokenizer_file)
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))
    assert tokenizer_path(tmp_path / "ckpt").read_bytes() == open(tokenizer_file, "rb").read()
    assert not list((tmp_path / "ckpt").glob("*.partial"))  # no temp files left behind


def test_wrong_size_is_refused(model_factory, tmp_path):
    save_native(model_factory("test-tiny"), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="'test-tiny' model.*not 'test-moe'"):
        load_model(tmp_path / "ckpt", size="test-moe")


def test_truncated_weights_are_refused(model_factory, tmp_path):
    save_native(model_factory("test-tiny"), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_model(tmp_path / "ckpt")


def test_missing_and_misshaped_keys_are_listed(model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    save_native(model_factory("test-tiny"), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(weights))
    del state["llm.norm.weight"]
    state["skip"] = torch.zeros(1, 1, 7)
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ckpt")
    msg = str(err.value)
    assert "missing keys (1)" in msg and "llm.norm.weight" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "skip: checkpoint (1, 1, 7) vs model (1, 1, 32)" in msg


def test_weights_without_config_and_bad_configs_are_refused(model_factory, tmp_path):
    save_native(model_factory("test-tiny"), tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    meta = json.loads(config.read_text())
    meta["config"]["llm"]["family"] = "gpt2"
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="invalid model config.*gpt2"):
        load_model(tmp_path / "ckpt")
    config.unlink()
    with pytest.raises(CheckpointError, match="not a sphinx-edge or LLaMA2-Accessory"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
