"""Growing the LLM in depth: the grown model computes what the original does, then trains."""

import pytest
import torch

from sphinx_edge.config import get_config
from sphinx_edge.model.sphinx import build_model
from sphinx_edge.train.deepen import deepen, deepened_config


@pytest.mark.parametrize("size", ["test-tiny", "test-moe"])
def test_the_grown_model_computes_what_the_original_does(size):
    model = build_model(get_config(size), seed=3)
    grown = deepen(model, 3 * model.config.llm.n_layers)
    assert grown.config.llm.n_layers == 3 * model.config.llm.n_layers
    assert grown.config.convnext == model.config.convnext and grown.config.name == model.config.name
    embeds = torch.randn(2, 9, model.config.llm.dim)
    with torch.no_grad():
        torch.testing.assert_close(grown.llm(embeds), model.llm(embeds), rtol=0, atol=1e-6)
    # ... because the copies' outputs are zero, not because the copies are missing
    old, new = model.state_dict(), grown.state_dict()
    assert torch.equal(new["llm.layers.3.attention.wqkv.weight"], old["llm.layers.1.attention.wqkv.weight"])
    assert not new["llm.layers.4.attention.wo.weight"].any()
    assert torch.equal(new["llm.layers.3.attention.wo.weight"], old["llm.layers.1.attention.wo.weight"])
    copies = [new[f"llm.layers.{i}.attention.wqkv.weight"] for i in (3, 4, 5)]
    assert len({t.data_ptr() for t in copies}) == 3  # each trains on its own
    for name, tensor in old.items():  # the experts, the projector, the embeddings are the original's
        if not name.startswith("llm.layers."):
            assert torch.equal(new[name], tensor), name


def test_the_silent_copies_learn():
    model = deepen(build_model(get_config("test-tiny"), seed=0), 4)
    embeds = torch.randn(1, 5, model.config.llm.dim)
    model.llm(embeds).square().mean().backward()
    assert model.llm.layers[1].attention.wo.weight.grad.abs().sum() > 0
    assert model.llm.layers[1].feed_forward.w2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_layers", [3, 1])
def test_only_multiples_of_the_depth_are_accepted(n_layers):
    with pytest.raises(ValueError, match="multiple"):
        deepened_config(get_config("test-tiny"), n_layers)
