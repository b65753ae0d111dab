"""Text generation with the PyTorch model: image -> views -> prefill -> KV-cache decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sphinx_edge.decoding import decode_loop
from sphinx_edge.layout import ImageSource, image_segments, preprocess
from sphinx_edge.config import SphinxConfig
from sphinx_edge.model.sphinx import SphinxModel
from sphinx_edge.prompt import ContextOverflowError, answer_room, format_prompt, turns_to_drop
from sphinx_edge.tokenizer import Tokenizer


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_len: int  # sequence length before generation (image tokens included)
    image_tokens: int
    stop_reason: str  # "stop" (a stop string), "eos" or "length"


def image_views(cfg: SphinxConfig, image: ImageSource, max_views: int | None = None):
    """`layout.preprocess` for a model of `cfg`: (tile plan, ConvNeXt views, DINOv2 views)."""
    return preprocess(image, layout=cfg.layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                      dino_size=cfg.dinov2.image_size, max_views=max_views)


def build_inputs(model: SphinxModel, tokenizer: Tokenizer, prompt: str, image: ImageSource | None,
                 max_views: int | None = None) -> tuple[torch.Tensor, int]:
    """Embeddings [1, L, dim] of BOS + image tokens + prompt, and the number of image tokens.
    `max_views`: the view budget of `layout.plan_tiles` (None: every tile the layout encodes)."""
    cfg = model.config
    ids = torch.tensor(tokenizer.encode(prompt, bos=True))
    if image is None:
        return model.embed_sequence(ids), 0
    plan, convnext_views, dinov2_views = image_views(cfg, image, max_views)
    dtype = next(model.convnext.parameters()).dtype
    views = model.encode_views(torch.from_numpy(convnext_views).to(dtype), torch.from_numpy(dinov2_views).to(dtype))
    return model.embed_sequence(ids, views, image_segments(plan)), plan.n_image_tokens(cfg.tokens_per_view)


@torch.inference_mode()
def generate(
    model: SphinxModel,
    tokenizer: Tokenizer,
    question: str | Sequence[tuple[str, str | None]],
    image: ImageSource | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    on_text: Callable[[str], None] | None = None,
    max_views: int | None = None,
) -> Generation:
    """Answers `question` (or continues a list of (question, answer) turns) about `image`."""
    turns = [(question, None)] if isinstance(question, str) else list(question)
    embeds, image_tokens = build_inputs(model, tokenizer, format_prompt(turns), image, max_views)
    prompt_len = embeds.shape[1]
    limit = model.config.llm.max_seq_len
    if prompt_len >= limit:
        raise ContextOverflowError(
            f"the prompt takes {prompt_len} tokens ({image_tokens} for the image); the context holds {limit}"
        )
    max_new_tokens = min(max_new_tokens, limit - prompt_len)
    llm = model.llm
    llm.setup_caches(max_seq_len=prompt_len + max_new_tokens)
    position = prompt_len

    def feed(token: int) -> np.ndarray:
        nonlocal position
        logits = llm(llm.tok_embeddings(torch.tensor([[token]])), torch.tensor([position]))
        position += 1
        return logits[0, -1].float().numpy()

    try:
        first = llm(embeds, torch.arange(prompt_len), last_logits_only=True)[0, -1].float().numpy()
        stream, stop_reason = decode_loop(first, feed, tokenizer.decode, tokenizer.eos_id,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          rng=np.random.default_rng(seed), on_text=on_text)
    finally:
        llm.clear_caches()
    return Generation(stream.text, stream.ids, prompt_len, image_tokens, stop_reason)


class TorchChat:
    """A multi-turn conversation about one image with the PyTorch model. Each turn re-runs the
    conversation (no cache between turns: this is the reference path); when it outgrows the context
    its oldest turns are dropped, the image stays."""

    def __init__(self, model: SphinxModel, tokenizer: Tokenizer, image: ImageSource | None = None) -> None:
        self.model, self.tokenizer, self.image = model, tokenizer, image
        self.turns: list[tuple[str, str | None]] = []
        self._image_tokens = 0  # known after the first answer

    def ask(self, question: str, *, max_new_tokens: int = 256, **sampling) -> tuple[Generation, int]:
        """The answer, and how many of the oldest turns were dropped to make room for it."""
        context = self.model.config.llm.max_seq_len
        length = lambda turns: self._image_tokens + len(self.tokenizer.encode(format_prompt(turns), bos=True))  # noqa: E731
        dropped = turns_to_drop(self.turns, question, length, context - answer_room(max_new_tokens, context))
        del self.turns[:dropped]
        out = generate(self.model, self.tokenizer, [*self.turns, (question, None)], self.image,
                       max_new_tokens=max_new_tokens, **sampling)
        self.turns.append((question, out.text.strip()))
        self._image_tokens = out.image_tokens
        return out, dropped
