"""The input sequence an app builds for a SPHINX program in a generic multimodal runner.

ExecuTorch's `MultimodalRunner` (and its Android / iOS demo apps) take a list of inputs, each
either token ids or ONE image tensor. Each image goes through the program's `vision_encoder` and
its output is spliced into the sequence where the input stands. A SPHINX image becomes:

    tokens [BOS]
    image  view 0 (the global view)              -> start_img, tokens_per_view - 2 features, end_img
    image  view 1 / tokens [skip_id] per tile     (tiles in row-major order; a fully padded tile is
    ...                                            ONE skip token, never encoded)
    tokens the prompt text (conv_v1_2 template), without BOS

Every image is a float32 [3, tile + dino, tile] tensor: the ConvNeXt view in rows [0, tile), the
DINOv2 view in the first `dino` columns of rows [tile, tile + dino) (`layout.pack_views`). The
skip, start and end ids sit just past the text vocabulary, so any runner places them as tokens.
Torch-free: the C++ runner and the demo apps get the same sequence from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sphinx_edge.config import SphinxConfig
from sphinx_edge.layout import ImageSource, image_segments, pack_views, preprocess
from sphinx_edge.prompt import Turn, format_prompt
from sphinx_edge.tokenizer import Tokenizer


@dataclass(frozen=True)
class Segment:
    """One runner input: token ids, or one packed view (float32 [3, tile + dino, tile])."""

    tokens: tuple[int, ...] = ()
    image: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "image" if self.image is not None else "tokens"


def build_inputs(config: SphinxConfig, tokenizer: Tokenizer, image: ImageSource | None,
                 question: str, history: Sequence[Turn] = (), layout: str | None = None) -> list[Segment]:
    """The whole first-turn sequence for `question` about `image` (after `history`, if any).
    `layout` overrides the model's (the benchmark compares skip tokens on and off)."""
    ids = tokenizer.encode(format_prompt([*history, (question, None)]), bos=True)
    segments = [Segment(tokens=(ids[0],))]
    if image is not None:
        plan, convnext_views, dinov2_views = preprocess(
            image, layout=layout or config.layout, grid=config.grid, tile_size=config.convnext.image_size,
            dino_size=config.dinov2.image_size)
        views = pack_views(convnext_views, dinov2_views)
        for kind, index in image_segments(plan):
            segments.append(Segment(image=views[index]) if kind == "view" else Segment(tokens=(config.skip_id,)))
    segments.append(Segment(tokens=tuple(ids[1:])))
    return _merge_tokens(segments)


def _merge_tokens(segments: list[Segment]) -> list[Segment]:
    """Adjacent token segments joined: fewer runner calls, same sequence."""
    out: list[Segment] = []
    for s in segments:
        if out and s.kind == "tokens" and out[-1].kind == "tokens":
            out[-1] = Segment(tokens=out[-1].tokens + s.tokens)
        else:
            out.append(s)
    return out


def sequence_length(segments: Sequence[Segment], tokens_per_view: int) -> int:
    """Positions the sequence takes in the KV cache."""
    return sum(tokens_per_view if s.kind == "image" else len(s.tokens) for s in segments)
