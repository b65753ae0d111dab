"""Time every stage of answering about an image, and the LLM alone (llama-bench's pp / tg).

Works on any `runtime.pipeline.Pipeline`, whatever its backend, so ONNX, ExecuTorch and the
PyTorch reference are timed by the same code. Each measurement runs `warmup` times untimed,
then `repeats` times; results keep every sample with their median, range, mean and stddev.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from sphinx_edge.prompt import format_prompt
from sphinx_edge.runtime.pipeline import Pipeline


def summary(values: list[float]) -> dict:
    """Median with its range (the stage tables) and mean ± sample stddev with every sample (the LLM
    figures, as llama-bench reports them)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "mean": statistics.fmean(values), "stddev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "samples": list(values)}


def _repeat(fn: Callable[[], dict[str, float]], warmup: int, repeats: int) -> dict[str, dict]:
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    return {k: summary([r[k] for r in runs]) for k in runs[0]}


def time_image(pipeline: Pipeline, image, prompt: str, *, layout: str | None = None, decode_tokens: int = 32,
               warmup: int = 1, repeats: int = 5) -> dict:
    """Stages of one answer, as `Pipeline` runs it (the views encoded one by one and prefilled as
    they come, in another thread with `pipeline.pipelined`): preprocess (decode + tiling), vision,
    prefill (the decoder's time), time to first token (wall clock), decode of exactly
    `decode_tokens` greedy tokens (EOS ignored, so every backend does the same work). Seconds."""
    backend, tok = pipeline.backend, pipeline.tokenizer
    ids = tok.encode(format_prompt([(prompt, None)]), bos=True)
    shape: dict[str, float] = {}

    def once() -> dict[str, float]:
        t0 = time.perf_counter()
        stream = pipeline.image_stream(image, layout=layout)
        logits = pipeline.prefill(ids, stream)
        t1 = time.perf_counter()
        prompt_len = len(ids) + len(stream)
        steps = max(0, min(decode_tokens, backend.max_seq_len - prompt_len))
        for _ in range(steps):
            logits = backend.forward(backend.embed(np.array([int(np.argmax(logits))])))
        t2 = time.perf_counter()
        t = stream.timings
        shape.update(views=t["views"], image_tokens=len(stream), prompt_tokens=prompt_len, decode_tokens=steps)
        prefill = pipeline.last_prefill_s
        return {"preprocess": t["preprocess"], "vision": t["vision"], "vision_per_view": t["vision"] / t["views"],
                "prefill": prefill, "prefill_tok_s": prompt_len / prefill, "ttft": t1 - t0,
                "decode_tok_s": steps / (t2 - t1) if steps else 0.0, "e2e": t2 - t0}

    stages = _repeat(once, warmup, repeats)
    return {**{k: int(v) for k, v in shape.items()}, "stages": stages}


class MeteredBackend:
    """A backend whose calls count towards a stage's peak RSS (system.StagePeaks): the vision
    encoder, prefill (a forward of several tokens) and decode (of one)."""

    def __init__(self, backend, peaks) -> None:
        self._backend, self._peaks = backend, peaks

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    @property
    def unwrapped(self):
        return self._backend

    def encode_views(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._peaks.measure("vision", self._backend.encode_views, pixel_values)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        return self._peaks.measure("prefill" if len(embeds) > 1 else "decode", self._backend.forward, embeds)


def time_llm(pipeline: Pipeline, pp: int = 512, tg: int = 128, warmup: int = 1, repeats: int = 3, *,
             seed: int = 0) -> dict:
    """llama-bench style: prefill `pp` tokens into an empty cache; generate `tg` tokens one at a
    time from an empty cache. Both are clipped to the context (`pp_tokens` / `tg_tokens` say what ran)."""
    backend = pipeline.backend
    pp, tg = min(pp, backend.max_seq_len), min(tg, backend.max_seq_len)
    vocab = pipeline.config.llm.vocab_size
    embeds = backend.embed(np.random.default_rng(seed).integers(0, vocab, pp))
    token = backend.embed(np.array([1]))

    def once() -> dict[str, float]:
        backend.truncate(0)
        t0 = time.perf_counter()
        backend.forward(embeds)
        t1 = time.perf_counter()
        backend.truncate(0)
        for _ in range(tg):
            backend.forward(token)
        t2 = time.perf_counter()
        return {"pp_tok_s": pp / (t1 - t0), "tg_tok_s": tg / (t2 - t1)}

    return {"pp_tokens": pp, "tg_tokens": tg, **_repeat(once, warmup, repeats)}
