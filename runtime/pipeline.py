"""Run an exported SPHINX model: image -> views (encoded tiles only) -> sequence -> prefill -> decode.

`Pipeline` loads an export directory by its manifest (every file's hash checked), and answers
questions about images with either backend; it keeps encoded images (runtime/image_cache.py) and
remembers which image's prefix (BOS + image tokens) its backend's cache holds. `Chat` keeps the KV
cache between turns and, on each turn, prefills only the tokens that the cache does not already
hold: a new conversation about the image in the cache prefills only its text. Torch-free unless the
ExecuTorch backend is chosen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sphinx_edge.config import SphinxConfig
from sphinx_edge.decoding import decode_loop
from sphinx_edge.layout import ImageSource, image_segments, pack_views, preprocess
from sphinx_edge.prompt import ContextOverflowError, Turn, answer_room, format_prompt, turns_to_drop
from sphinx_edge.runtime.backends import BACKENDS
from sphinx_edge.runtime.image_cache import DEFAULT_DISK_BYTES, ImageCache, export_key, image_key
from sphinx_edge.runtime.manifest import ManifestError, check_files, graph_files, read_manifest
from sphinx_edge.tokenizer import Tokenizer


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_len: int  # sequence length before generation, image tokens included
    prefilled: int  # tokens prefilled for this answer (less than prompt_len when the cache was reused)
    image_tokens: int
    stop_reason: str  # "stop", "eos" or "length"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    dropped_turns: int = 0  # oldest turns of the conversation dropped so that this one fits


class Pipeline:
    """An export directory behind one backend: `backend` names one of BACKENDS, or is a ready
    backend object (the benchmark's PyTorch reference) that then uses only the export's
    manifest and tokenizer, or is None (no graphs loaded: the config and tokenizer alone, as
    `runtime.request` needs them)."""

    def __init__(self, export_dir: str | os.PathLike, backend="onnx", *, threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if isinstance(backend, str) and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        named = isinstance(backend, str)
        files = graph_files(self.manifest, backend) if named else {}
        tokenizer = self.manifest.get("tokenizer")
        if not tokenizer:
            raise ManifestError(f"{self.export_dir} carries no tokenizer")
        check_files(self.export_dir, self.manifest, [f for fs in files.values() for f in fs] + [tokenizer])
        try:
            self.config = SphinxConfig.from_dict(self.manifest["model"]["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{self.export_dir}: the manifest's model config is invalid: {e}") from e
        self.tokenizer = Tokenizer(self.export_dir / tokenizer)
        self.backend = BACKENDS[backend](self.export_dir, files, self.config, threads) if named else backend
        # Encoded images, by export + image + layout (the graphs that compute them: all but the decoder's).
        self.image_cache = ImageCache(cache_dir, cache_bytes)
        image_files = [f for name, fs in files.items() if name != "decoder" for f in fs]
        self._export_key = export_key(self.manifest, image_files) if named else None
        self.resident_image: str | None = None  # the image whose BOS + image tokens the backend's cache holds

    # -- pieces -----------------------------------------------------------------------------

    def encode_image(self, image: ImageSource, layout: str | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """The image part of the sequence [n_image_tokens, dim] and the time of each stage.
        `layout` overrides the model's (the benchmark compares skip tokens on and off)."""
        cfg = self.config
        t0 = time.perf_counter()
        plan, convnext_views, dinov2_views = preprocess(image, layout=layout or cfg.layout, grid=cfg.grid,
                                                        tile_size=cfg.convnext.image_size,
                                                        dino_size=cfg.dinov2.image_size)
        pixels = pack_views(convnext_views, dinov2_views)
        t1 = time.perf_counter()
        views = self.backend.encode_views(pixels)
        t2 = time.perf_counter()
        skip = self.backend.embed(np.array([cfg.skip_id]))[0] if plan.n_skipped else None
        parts = [views[index] if kind == "view" else skip[None] for kind, index in image_segments(plan)]
        return np.concatenate(parts), {"preprocess": t1 - t0, "vision": t2 - t1, "views": float(plan.n_views)}

    def image_embeds(self, image: ImageSource, layout: str | None = None) -> tuple[str | None, np.ndarray, dict]:
        """`encode_image` through the image cache: (cache key, image part, timings). A cached image
        costs no preprocessing and no vision encoder (timings say `image_cached`)."""
        if self._export_key is None:  # a backend object (the benchmark's reference): nothing to key on
            return None, *self.encode_image(image, layout)
        key = image_key(self._export_key, image, layout or self.config.layout)
        found = self.image_cache.get(key)
        if found is not None:
            embeds, info = found
            return key, embeds, {"preprocess": 0.0, "vision": 0.0, "views": info["views"], "image_cached": 1.0}
        embeds, timings = self.encode_image(image, layout)
        self.image_cache.put(key, embeds, {"views": timings["views"]})
        return key, embeds, timings

    def prefill(self, ids: Sequence[int], image_embeds: np.ndarray | None = None) -> np.ndarray:
        """A fresh sequence (BOS, the image part, the rest of `ids`) into an empty cache; last logits."""
        backend = self.backend
        self.resident_image = None
        backend.truncate(0)
        parts = [backend.embed(np.asarray(ids[:1]))]
        if image_embeds is not None:
            parts.append(image_embeds)
        parts.append(backend.embed(np.asarray(ids[1:])))
        return backend.forward(np.concatenate(parts))

    # -- one question -----------------------------------------------------------------------

    def answer(self, question: str, image: ImageSource | None = None, **kw) -> Answer:
        """Answers one question about `image` (a fresh conversation)."""
        return Chat(self, image).ask(question, **kw)


class Chat:
    """A multi-turn conversation about one image; the KV cache carries over between turns."""

    def __init__(self, pipeline: Pipeline, image: ImageSource | None = None) -> None:
        self.pipeline, self.image = pipeline, image
        self.turns: list[Turn] = []
        self._image_key: str | None = None
        self._image_embeds: np.ndarray | None = None
        self._cached: list[int] = []  # text ids (BOS first) whose positions the cache holds

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        p, backend, tok = self.pipeline, self.pipeline.backend, self.pipeline.tokenizer
        timings: dict[str, float] = {}
        if self.image is not None and self._image_embeds is None:
            self._image_key, self._image_embeds, image_timings = p.image_embeds(self.image)
            timings.update(image_timings)
            if self._image_key is not None and p.resident_image == self._image_key:
                self._cached = [tok.bos_id]  # a new conversation about the image in the cache: its prefix stays
        n_image = 0 if self._image_embeds is None else len(self._image_embeds)
        # When the history no longer fits (with room for the answer), the oldest turns go; BOS and
        # the image stay, so the cache keeps them and only the text after the system prompt is redone.
        dropped = turns_to_drop(self.turns, question, lambda turns: n_image + len(tok.encode(format_prompt(turns), bos=True)),
                                backend.max_seq_len - answer_room(max_new_tokens, backend.max_seq_len))
        self.turns = self.turns[dropped:]
        ids = tok.encode(format_prompt([*self.turns, (question, None)]), bos=True)
        prompt_len = n_image + len(ids)
        if prompt_len >= backend.max_seq_len:
            raise ContextOverflowError(
                f"the conversation takes {prompt_len} tokens ({n_image} for the image); the context holds "
                f"{backend.max_seq_len}: ask a shorter question.")
        max_new_tokens = min(max_new_tokens, backend.max_seq_len - prompt_len)

        t0 = time.perf_counter()
        keep = min(_common_prefix(self._cached, ids), len(ids) - 1)  # prefill >= 1 token, for its logits
        if keep == 0:  # nothing reusable: BOS, the image, then the text
            logits = p.prefill(ids, self._image_embeds)
            prefilled = prompt_len
        else:
            backend.truncate(n_image + keep)
            logits = backend.forward(backend.embed(np.array(ids[keep:])))
            prefilled = len(ids) - keep
        timings["prefill"] = time.perf_counter() - t0
        timings["prefill_tokens"] = float(prefilled)
        p.resident_image = self._image_key
        self._cached = ids
        decode_start = time.perf_counter()

        def feed(token: int) -> np.ndarray:
            self._cached.append(token)
            return backend.forward(backend.embed(np.array([token])))

        stream, stop_reason = decode_loop(
            logits, feed, tok.decode, tok.eos_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, rng=np.random.default_rng(seed), on_text=on_text)
        timings["decode"] = time.perf_counter() - decode_start
        timings["decode_tokens"] = float(max(len(stream.ids) - 1, 0))
        self.turns.append((question, stream.text.strip()))
        return Answer(stream.text, stream.ids, prompt_len, prefilled, n_image, stop_reason, timings, dropped)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

