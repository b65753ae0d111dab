"""Run an exported SPHINX model: image -> views (encoded tiles only) -> sequence -> prefill -> decode.

`Pipeline` loads an export directory by its manifest (every file's hash checked), and answers
questions about images with either backend; it keeps encoded images (runtime/image_cache.py) and
remembers which image's prefix (BOS + image tokens) its backend's cache holds. `Chat` keeps the KV
cache between turns and, on each turn, prefills only the tokens that the cache does not already
hold: a new conversation about the image in the cache prefills only its text. Torch-free unless the
ExecuTorch backend is chosen.

The vision encoder runs one view at a time (`ImageStream`), so its activations are one view's, and
they are handed back to the system before the text is prefilled. The prefill takes the image part
as the views come out; with `pipelined=True` the next view is encoded in another thread while the
decoder prefills the last one (it pays where vision runs on another unit than the decoder).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sphinx_edge.config import SphinxConfig
from sphinx_edge.decoding import decode_loop
from sphinx_edge.layout import ImageSource, TilePlan, image_segments, pack_views, preprocess
from sphinx_edge.processes import release_free_memory, return_large_blocks_promptly
from sphinx_edge.prompt import ContextOverflowError, Turn, answer_room, format_prompt, turns_to_drop
from sphinx_edge.runtime.backends import BACKENDS
from sphinx_edge.runtime.image_cache import DEFAULT_DISK_BYTES, ImageCache, image_export_key, image_key
from sphinx_edge.runtime.manifest import ManifestError, check_files, graph_files, read_manifest
from sphinx_edge.tokenizer import Tokenizer

# Prefill runs in chunks of at most this many tokens: the logits of a chunk ([T, vocab] floats) and
# its activations are what a prefill adds to memory, and chunks this long prefill as fast as one
# call (benchmarks/RESULTS.md, "Memory of a full answer").
PREFILL_CHUNK = 256


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
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int = DEFAULT_DISK_BYTES,
                 max_views: int | None = None, pipelined: bool = False) -> None:
        if max_views is not None and max_views < 1:
            raise ValueError(f"max_views must be at least 1 (the global view), got {max_views}")
        return_large_blocks_promptly()  # an answer's peak memory is its weights and one view's activations
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
        self._export_key = image_export_key(self.manifest, files) if named else None
        self.resident_image: str | None = None  # the image whose BOS + image tokens the backend's cache holds
        self.max_views = max_views  # encoded views per image, the global one included (None: the layout's all)
        self.pipelined = pipelined
        self.last_prefill_s = 0.0

    # -- pieces -----------------------------------------------------------------------------

    def image_stream(self, image: ImageSource, layout: str | None = None) -> ImageStream:
        """The image part of the sequence, to be encoded view by view as it is read.
        `layout` overrides the model's (the benchmark compares skip tokens on and off)."""
        return ImageStream(self, image, layout or self.config.layout)

    def encode_image(self, image: ImageSource, layout: str | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """The image part of the sequence [n_image_tokens, dim] and the time of each stage."""
        stream = self.image_stream(image, layout)
        return np.concatenate(list(stream)), stream.timings

    def image_embeds(self, image: ImageSource,
                     layout: str | None = None) -> tuple[str | None, np.ndarray | ImageStream, dict[str, float]]:
        """The image part through the image cache: (cache key, the cached part or a stream that
        fills the cache as it is read, the stage timings: a stream's fill in as it is read).
        A cached image costs no preprocessing and no vision encoder (timings say `image_cached`)."""
        layout = layout or self.config.layout
        if self._export_key is None:  # a backend object (the benchmark's reference): nothing to key on
            stream = self.image_stream(image, layout)
            return None, stream, stream.timings
        key = image_key(self._export_key, image, layout, self.max_views)
        found = self.image_cache.get(key)
        if found is not None:
            embeds, info = found
            return key, embeds, {"preprocess": 0.0, "vision": 0.0, "views": info["views"], "image_cached": 1.0}
        stream = self.image_stream(image, layout)
        stream.on_done = lambda embeds: self.image_cache.put(key, embeds, {"views": stream.timings["views"]})
        return key, stream, stream.timings

    def prefill(self, ids: Sequence[int], image: np.ndarray | ImageStream | None = None) -> np.ndarray:
        """A fresh sequence (BOS, the image part, the rest of `ids`) into an empty cache; last logits.
        The image part may be a stream: each view is prefilled as it comes out of the vision encoder."""
        backend = self.backend
        self.resident_image = None
        self.last_prefill_s = 0.0  # the decoder's time (without the vision encoder's, when streamed)
        backend.truncate(0)
        pieces: Iterable[np.ndarray] = ()
        if isinstance(image, ImageStream):
            pieces = _prefetched(image) if self.pipelined else image
        elif image is not None:
            pieces = (image,)
        pending = [backend.embed(np.asarray(ids[:1]))]
        for piece in pieces:
            pending.append(piece)
            pending = self._forward_full_chunks(pending)
        pending.append(backend.embed(np.asarray(ids[1:])))
        return self._forward_chunks(np.concatenate(pending))

    def _forward_full_chunks(self, pending: list[np.ndarray]) -> list[np.ndarray]:
        """Prefills the whole PREFILL_CHUNKs in `pending`; what is left, to be continued."""
        joined = np.concatenate(pending)
        whole = len(joined) // PREFILL_CHUNK * PREFILL_CHUNK
        if whole:
            self._forward_chunks(joined[:whole])
        return [joined[whole:]]

    def _forward_chunks(self, embeds: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        for start in range(0, len(embeds), PREFILL_CHUNK):
            logits = self.backend.forward(embeds[start:start + PREFILL_CHUNK])
        self.last_prefill_s += time.perf_counter() - t0
        return logits

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
        asked = time.perf_counter()
        p, backend, tok = self.pipeline, self.pipeline.backend, self.pipeline.tokenizer
        timings: dict[str, float] = {}
        image_timings: dict[str, float] = {}
        if self.image is not None and self._image_embeds is None:
            self._image_key, self._image_embeds, image_timings = p.image_embeds(self.image)
            if self._image_key is not None and p.resident_image == self._image_key:
                self._cached = [tok.bos_id]  # a new conversation about the image in the cache: its prefix stays
        image = self._image_embeds
        if isinstance(image, ImageStream) and image.done:
            image = self._image_embeds = image.embeds
        n_image = 0 if image is None else len(image)
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
            logits = p.prefill(ids, image)
            prefilled = prompt_len
            if isinstance(image, ImageStream):
                self._image_embeds = image.embeds
        else:
            backend.truncate(n_image + keep)
            logits = backend.forward(backend.embed(np.array(ids[keep:])))
            prefilled = len(ids) - keep
        timings.update(image_timings)
        timings["prefill"] = p.last_prefill_s if keep == 0 else time.perf_counter() - t0  # the decoder's share
        timings["ttft"] = time.perf_counter() - asked
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



class ImageStream:
    """The image part of the sequence, encoded one view at a time as it is iterated (a skip token
    rides with the next view). Its length is known from the tile plan before anything is encoded;
    once read through, `embeds` holds the whole part and `timings` the preprocess and vision times
    (vision: the encoder's time alone, whatever ran between the views)."""

    def __init__(self, pipeline: Pipeline, image: ImageSource, layout: str) -> None:
        cfg = pipeline.config
        t0 = time.perf_counter()
        self.plan: TilePlan
        self.plan, convnext_views, dinov2_views = preprocess(
            image, layout=layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
            dino_size=cfg.dinov2.image_size, max_views=pipeline.max_views)
        self._pixels = pack_views(convnext_views, dinov2_views)
        self._backend, self._skip_id = pipeline.backend, cfg.skip_id
        self.n_tokens = self.plan.n_image_tokens(cfg.tokens_per_view)
        self.timings = {"preprocess": time.perf_counter() - t0, "vision": 0.0, "views": float(self.plan.n_views)}
        self.embeds: np.ndarray | None = None
        self.on_done: Callable[[np.ndarray], None] | None = None

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def done(self) -> bool:
        return self.embeds is not None

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.embeds is not None:
            yield self.embeds
            return
        backend, pieces, skips = self._backend, [], []
        skip = backend.embed(np.array([self._skip_id])) if self.plan.n_skipped else None
        for kind, index in image_segments(self.plan):
            if kind == "skip":
                skips.append(skip)
                continue
            t0 = time.perf_counter()
            view = backend.encode_views(self._pixels[index:index + 1])[0]
            self.timings["vision"] += time.perf_counter() - t0
            if index == self.plan.n_views - 1:
                release_free_memory()  # the encoder's activations, back to the system before the text
            pieces.append(np.concatenate([*skips, view]) if skips else view)
            skips = []
            yield pieces[-1]
        if skips:
            pieces.append(np.concatenate(skips))
            yield pieces[-1]
        self.embeds = np.concatenate(pieces)
        self._pixels = None
        if self.on_done is not None:
            self.on_done(self.embeds)


def _prefetched(stream: ImageStream) -> Iterator[np.ndarray]:
    """`stream`'s pieces, the next one encoded in a worker thread while the caller uses the last."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []
    end = object()

    def produce() -> None:
        try:
            for piece in stream:
                ready.put(piece)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
        finally:
            ready.put(end)

    worker = threading.Thread(target=produce, name="sphinx-edge-vision", daemon=True)
    worker.start()
    try:
        while (piece := ready.get()) is not end:
            yield piece
    finally:
        while worker.is_alive():  # a caller that stops early: let the worker finish its view
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()
    if failure:
        raise failure[0]
