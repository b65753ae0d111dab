"""Checkpoints read one tensor at a time: a part of the model reads only its own tensors, the model made
that way equals the one read whole, and a quantizing hook sees each module as it arrives."""

import pytest
import torch

from sphinx_edge.checkpoints import load_model, open_checkpoint
from sphinx_edge.checkpoints.accessory import write_accessory
from sphinx_edge.checkpoints.lazy import LazyTensors
from sphinx_edge.checkpoints.native import save_native
from tests.checkpoints.test_accessory import write_released

WRITERS = {"native": lambda model, path: save_native(model, path),
           "accessory": lambda model, path: write_accessory(model, path, mp=2),
           "four-expert accessory": write_released}
SIZES = {"native": "test-tiny", "accessory": "test-moe", "four-expert accessory": "test-ens5"}


@pytest.fixture(params=list(WRITERS))
def written(request, model_factory, tmp_path):
    model = model_factory(SIZES[request.param], seed=5)
    WRITERS[request.param](model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_the_tensors_are_described_without_being_read(written, monkeypatch):
    model, path = written
    reads = []
    monkeypatch.setattr(LazyTensors, "__getitem__", lambda self, name: reads.append(name))
    config, tensors = open_checkpoint(path)
    assert config == model.config and not reads
    assert {k: (t.shape, t.dtype) for k, t in tensors.meta.items()} == {
        k: (t.shape, t.dtype) for k, t in model.state_dict().items()}


def test_a_part_reads_only_its_tensors_and_equals_the_whole(written, monkeypatch):
    model, path = written
    reads = []
    read = LazyTensors.__getitem__
    monkeypatch.setattr(LazyTensors, "__getitem__", lambda self, name: reads.append(name) or read(self, name))
    part = load_model(path, only=("dinov2", "llm.norm"))
    assert reads and all(name.startswith(("dinov2.", "llm.norm.")) for name in reads)
    whole = dict(model.named_parameters())
    for name, p in part.named_parameters():
        if name in reads:
            assert torch.equal(p, whole[name]), name
        else:
            assert p.is_meta, name
    assert set(reads) == {n for n in whole if n.startswith(("dinov2.", "llm.norm."))}


def test_each_module_is_handed_over_once_its_weights_are_in(written):
    model, path = written
    seen = []

    def on_module(name, module):
        assert not any(p.is_meta for p in module.parameters(recurse=False)), name
        seen.append(name)

    loaded = load_model(path, on_module=on_module)
    assert seen == [name for name, _ in loaded.named_modules()]
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_bf16_checkpoint_keeps_its_dtype_when_asked(model_factory, tmp_path):
    save_native(model_factory("test-tiny", seed=2).to(torch.bfloat16), tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt", dtype=None).llm.output.weight.dtype == torch.bfloat16
    fp32 = load_model(tmp_path / "ckpt")
    assert fp32.llm.output.weight.dtype == torch.float32
    assert torch.equal(fp32.llm.output.weight.to(torch.bfloat16), load_model(tmp_path / "ckpt", dtype=None).llm.output.weight)
