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
    """Stages of one answer: preprocess (decode + tiling), vision, prefill, decode of exactly
    `decode_tokens` greedy tokens (EOS ignored, so every backend does the same work).
    Times in seconds; `ttft` = preprocess + vision + prefill."""
    backend, tok = pipeline.backend, pipeline.tokenizer
    ids = tok.encode(format_prompt([(prompt, None)]), bos=True)
    shape: dict[str, float] = {}

    def once() -> dict[str, float]:
        image_embeds, t = pipeline.encode_image(image, layout=layout)
        prompt_len = len(ids) + len(image_embeds)
        steps = max(0, min(decode_tokens, backend.max_seq_len - prompt_len))
        t0 = time.perf_counter()
        logits = pipeline.prefill(ids, image_embeds)
        t1 = time.perf_counter()
        for _ in range(steps):
            logits = backend.forward(backend.embed(np.array([int(np.argmax(logits))])))
        t2 = time.perf_counter()
        shape.update(views=t["views"], image_tokens=len(image_embeds), prompt_tokens=prompt_len, decode_tokens=steps)
        prefill, decode = t1 - t0, t2 - t1
        ttft = t["preprocess"] + t["vision"] + prefill
        return {"preprocess": t["preprocess"], "vision": t["vision"], "vision_per_view": t["vision"] / t["views"],
                "prefill": prefill, "prefill_tok_s": prompt_len / prefill, "ttft": ttft,
                "decode_tok_s": steps / decode if steps else 0.0, "e2e": ttft + decode}

    stages = _repeat(once, warmup, repeats)
    return {**{k: int(v) for k, v in shape.items()}, "stages": stages}


def time_llm(pipeline: Pipeline, *, pp: int = 512, tg: int = 128, warmup: int = 1, repeats: int = 3,
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
