"""Finer views for a trained two-expert model: the same weights, more tokens per view.

A view of `view_size` pixels gives ConvNeXt (output stride 32) a (view_size / 32)^2 token map, and
DINOv2 the same grid when its view is that many patches wide; the canvas (a grid of views) grows with
it. No weight changes shape: ConvNeXt is convolutional, and DINOv2 interpolates its stored position
table to whatever grid it is given, as the released models do (37 stored, 16 used). So a model trained
on coarse views starts from what it knows and trains on finer ones (LLaVA-style resolution growth).
"""

from __future__ import annotations

import dataclasses

from sphinx_edge.config import SphinxConfig
from sphinx_edge.model.sphinx import SphinxModel, model_of_state

_STRIDE = 32  # ConvNeXt's output stride: one token per 32 x 32 pixels of a view


def resized_config(config: SphinxConfig, view_size: int) -> SphinxConfig:
    """`config` with views of `view_size` pixels (a multiple of 32) for both experts."""
    if config.clip is not None or config.convnext.input_size or config.convnext.token_upsample != 1:
        raise ValueError(f"view_size: only two-expert models whose ConvNeXt reads its view as it is can "
                         f"change views ({config.name!r} cannot)")
    if view_size < _STRIDE or view_size % _STRIDE:
        raise ValueError(f"view_size = {view_size}: it must be a multiple of {_STRIDE} (one token per "
                         f"{_STRIDE} x {_STRIDE} pixels)")
    side = view_size // _STRIDE
    return dataclasses.replace(
        config,
        convnext=dataclasses.replace(config.convnext, image_size=view_size),
        dinov2=dataclasses.replace(config.dinov2, image_size=side * config.dinov2.patch_size))


def resize_views(model: SphinxModel, view_size: int) -> SphinxModel:
    """`model` reading views of `view_size` pixels. The new model takes over `model`'s tensors: use it
    instead of `model`. Returns `model` itself when its views are that size already."""
    if view_size == model.config.convnext.image_size:
        return model
    return model_of_state(resized_config(model.config, view_size), model.state_dict()).train(model.training)
