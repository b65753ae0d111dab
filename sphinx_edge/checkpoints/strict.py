"""Strict state-dict loading: a checkpoint that does not fit exactly is refused with a full list."""

from __future__ import annotations

from collections.abc import Mapping

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free to import: CheckpointError is raised before any tensor is read
    import torch
    from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of another model family or does not match the model."""


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = [
        _listing(title, items)
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n" + "\n".join(problems))


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Checks `state` against `model`, then loads it (assigning tensors: works on a meta model)."""
    check_state_dict(model, state, source)
    dtype = next(iter(model.state_dict().values())).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
