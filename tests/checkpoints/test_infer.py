"""Released checkpoints load the first time: the configuration is read from meta.json, config.json and
the tensor shapes (no --size), --size is a check that names what differs, the dtype is kept, and
hf:// sources come from the Hugging Face cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sphinx_edge.bundled import SAMPLES
from sphinx_edge.checkpoints import CheckpointError, load_model
from sphinx_edge.checkpoints.accessory import write_accessory
from sphinx_edge.config import CLIPViTConfig, ConvNeXtConfig, DINOv2Config, LLMConfig, QFormerConfig, SphinxConfig
from sphinx_edge.config import get_config
from sphinx_edge.model.sphinx import build_model
from tests.checkpoints.test_accessory import image_logits, write_released
from tests.test_cli import run

SCRIPT = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[2] / ".venv")) / "bin" / "sphinx-edge"

# A llama_ens5_light model matching no registered size: a small LLM and both encoders at widths and
# depths of no size, on the released view sides (512 / 224 px) and the 1k layout, as SPHINX-Tiny-1k.
CUSTOM = SphinxConfig(
    "custom",
    LLMConfig("llama", 48, 3, 4, 2, 80, 256, max_seq_len=1024),
    ConvNeXtConfig(depths=(1, 2, 1, 1), dims=(8, 16, 24, 40), image_size=512),
    DINOv2Config(embed_dim=64, depth=2, n_heads=1, ffn="mlp", mlp_ratio=3.0, pos_grid=5, image_size=224),
    layout="sphinx-1k", llama_type="llama_ens5_light")


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A released-layout directory (meta.json + config.json + one bf16 shard) and its model."""
    path = tmp_path_factory.mktemp("released")
    model = build_model(CUSTOM, seed=3).eval().to(torch.bfloat16)
    write_accessory(model, path, mp=1)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "consolidated.00-of-01.model.pth", "meta.json"]
    return path, model.float()


def test_convert_with_no_size_reads_the_configuration_and_keeps_the_dtype(released, tokenizer, tmp_path):
    path, model = released
    code, out = run("convert", path, "--out", tmp_path / "out")
    assert code == 0, out
    assert "custom" in out and "sphinx-1k" in out and "bfloat16" in out
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = load_model(tmp_path / "out")
    assert loaded.config == CUSTOM
    torch.testing.assert_close(image_logits(loaded, tokenizer), image_logits(model, tokenizer), atol=1e-5, rtol=0)
    code, out = run("convert", path, "--out", tmp_path / "fp32", "--dtype", "float32")
    assert code == 0 and "float32" in out


def test_a_wrong_size_is_refused_naming_what_differs(released, tmp_path):
    path, _ = released
    code, out = run("convert", path, "--out", tmp_path / "out", "--size", "tiny")
    assert code == 2 and "does not have the shape of size 'tiny'" in out
    assert "llm.dim: checkpoint 48, size 2048" in out and "convnext.dims: checkpoint (8, 16, 24, 40)" in out
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="llama model .* 'test-intern2' is a internlm2"):
        load_model(path, "test-intern2")


@pytest.mark.parametrize("size", ["test-tiny", "test-1k", "test-intern2"])
def test_a_registered_shape_loads_as_that_size(model_factory, tokenizer, tmp_path, size):
    model = model_factory(size, seed=4)
    write_accessory(model, tmp_path, mp=2)
    loaded = load_model(tmp_path)
    assert loaded.config.name == size and loaded.config.layout == model.config.layout
    torch.testing.assert_close(image_logits(loaded, tokenizer), image_logits(model, tokenizer), atol=1e-5, rtol=0)


def test_tiles_take_the_layout_from_the_model(released):
    path, _ = released
    code, out = run("tiles", SAMPLES / "wide_2x1.png", "--checkpoint", path)
    assert code == 0 and "sphinx-1k" in out, out
    code, out = run("tiles", SAMPLES / "wide_2x1.png", "--size", "tiny")
    assert code == 0 and "sphinx-x" in out


def test_a_four_expert_checkpoint_of_no_registered_size(tokenizer, tmp_path):
    """A llama_ens5 model with an LLM of no size: the test-ens5 encoders keep that size's views; encoders
    of no size get the released SPHINX-1k's views (224 px, ConvNeXt read as 256 px, 2x2 tiles)."""
    llm = LLMConfig("llama", 48, 3, 4, 2, 80, 256, max_seq_len=1024)
    small = dataclasses.replace(get_config("test-ens5"), name="custom", paper_name="", llm=llm)
    unseen = SphinxConfig(
        "custom", llm,
        ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 40), image_size=224, input_size=256, token_upsample=2),
        DINOv2Config(embed_dim=64, depth=1, n_heads=1, ffn="mlp", mlp_ratio=2.0, pos_grid=5, image_size=224),
        layout="sphinx-1k", grid=2, llama_type="llama_ens5",
        clip=CLIPViTConfig(width=16, layers=1, heads=1, mlp_ratio=2.0, output_dim=8),
        qformer=QFormerConfig(vision_dim=16, vision_layers=1, vision_heads=1, vision_mlp=32, qformer_dim=8,
                              qformer_layers=1, qformer_heads=1, qformer_mlp=16, n_queries=2))
    for i, cfg in enumerate((small, unseen)):
        model = build_model(cfg, seed=3).eval()
        write_released(model, tmp_path / str(i))
        loaded = load_model(tmp_path / str(i))
        assert loaded.config == cfg
        torch.testing.assert_close(image_logits(loaded, tokenizer), image_logits(model, tokenizer), atol=1e-4, rtol=0)


def _hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache holding `files` at `repo`'s main revision, laid out as huggingface_hub does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, src in files.items():
        blob = root / "blobs" / f"{abs(hash(name)):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_sources_load_from_the_cache_offline(released, tmp_path):
    path, _ = released
    sub = "finetune/mm/SPHINX/SPHINX-Custom-1k"
    _hub_cache(tmp_path / "hub", "Owner/Accessory", {f"{sub}/{p.name}": p for p in path.iterdir()}
               | {"README.md": path / "meta.json"})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    ok = subprocess.run([str(SCRIPT), "convert", f"hf://Owner/Accessory/{sub}", "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["config"]["dinov2"]["embed_dim"] == 64
    missing = subprocess.run([str(SCRIPT), "convert", "hf://Owner/Elsewhere", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "hf://Owner/Elsewhere is not in the Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "x").exists()
