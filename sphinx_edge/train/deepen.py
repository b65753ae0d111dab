"""Growing a trained LLM in depth: LLaMA Pro's block expansion (Wu et al., 2024).

After each block goes a copy of it whose two output projections (attention `wo`, feed-forward `w2`)
are zero. A block adds its output to the residual stream, so a zero output leaves the stream as it was:
the grown model computes exactly what the original does at step 0, and training starts from what the
small model knew rather than from noise. The copies' other weights are the original block's, so the
projections that start at zero get useful gradients from the first step.
"""

from __future__ import annotations

import dataclasses

import torch

from sphinx_edge.config import SphinxConfig
from sphinx_edge.model.sphinx import SphinxModel, model_of_state

# The output projections of a block: attention's, and the feed-forward's (a mixtral block's experts'
# stacked w2 is a parameter of its own, not a Linear's weight).
_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w2")


def deepened_config(config: SphinxConfig, n_layers: int) -> SphinxConfig:
    """`config` with an LLM of `n_layers` blocks: a multiple of its own, at least as many."""
    have = config.llm.n_layers
    if n_layers < have or n_layers % have:
        raise ValueError(f"llm_layers = {n_layers}: the LLM has {have} blocks and grows only to a multiple of "
                         f"that")
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, n_layers=n_layers))


def deepen(model: SphinxModel, n_layers: int) -> SphinxModel:
    """`model` with `n_layers` LLM blocks: each block followed by copies of it that add nothing (above).
    The grown model takes over `model`'s tensors (only the copies are new memory): use it instead of
    `model`, not beside it. Returns `model` itself when it already has that many blocks."""
    if n_layers == model.config.llm.n_layers:
        return model
    config = deepened_config(model.config, n_layers)
    factor = n_layers // model.config.llm.n_layers
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("llm.layers."):
            state[name] = tensor
            continue
        index, rest = name.removeprefix("llm.layers.").split(".", 1)
        first = int(index) * factor
        state[f"llm.layers.{first}.{rest}"] = tensor
        for copy in range(1, factor):  # each a tensor of its own: copies sharing one would train as one
            state[f"llm.layers.{first + copy}.{rest}"] = (
                torch.zeros_like(tensor) if rest.endswith(_OUTPUTS) else tensor.clone())
    return model_of_state(config, state).train(model.training)
