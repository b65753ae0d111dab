"""Reading what the C++ runner (runtime/cpp/sphinx_runner) prints, on a device or here.

The runner ends with three machine-readable lines (runtime/cpp/README.md):

    SPHINX_TEXT "yellow"                      (the answer, a JSON string)
    SPHINX_TOKENS 422 3 263                   (the generated ids)
    SPHINX_STAT load_ms=31.4 vision_ms=14.6 views=3 prefill_ms=38.4 prefill_tokens=104 ...

`parse_runner_output` turns them into the shape of `stages.time_image`'s stages, in seconds, so
device runs sit in the same tables. Image preprocessing happens on the host when the request is
written (`sphinx-edge request`), so there is no "preprocess" stage and "ttft" starts at vision.
"""

from __future__ import annotations

import json
from typing import Any

ERROR_PREFIX = "sphinx_runner: error:"


class RunnerOutputError(ValueError):
    """The output holds no result: the runner failed, or this is not its output."""


def _stat_fields(line: str) -> dict[str, str]:
    fields = {}
    for item in line.split()[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise RunnerOutputError(f"malformed SPHINX_STAT field {item!r}")
        fields[key] = value
    return fields


def parse_runner_output(text: str) -> dict[str, Any]:
    """The answer, its token ids and the stage timings of one sphinx_runner run (seconds, as in
    benchmarks/stages.py). Raises RunnerOutputError with the runner's own message when it failed."""
    lines = text.splitlines()
    errors = [line[len(ERROR_PREFIX):].strip() for line in lines if line.startswith(ERROR_PREFIX)]
    found: dict[str, str] = {}
    for line in lines:  # the last of each wins: the answer text itself comes first and is free-form
        for tag in ("SPHINX_TEXT", "SPHINX_TOKENS", "SPHINX_STAT"):
            if line == tag or line.startswith(tag + " "):
                found[tag] = line
    if "SPHINX_STAT" not in found:
        if errors:
            raise RunnerOutputError(f"sphinx_runner failed: {errors[-1]}")
        raise RunnerOutputError("no SPHINX_STAT line: this is not the output of a finished sphinx_runner run")
    try:
        f = _stat_fields(found["SPHINX_STAT"])
        ms = {k: float(f[f"{k}_ms"]) / 1000 for k in ("load", "vision", "prefill", "ttft", "decode")}
        views, prefill_tokens = int(f["views"]), int(f["prefill_tokens"])
        decode_tokens = int(f["decode_tokens"])
        answer = json.loads(found["SPHINX_TEXT"][len("SPHINX_TEXT "):]) if "SPHINX_TEXT" in found else None
        ids = [int(t) for t in found.get("SPHINX_TOKENS", "SPHINX_TOKENS").split()[1:]]
        peak_kb, threads = int(f["peak_rss_kb"]), int(f["threads"])
    except KeyError as e:
        raise RunnerOutputError(f"SPHINX_STAT lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise RunnerOutputError(f"unreadable runner output: {e}") from None
    stages = {
        "vision": ms["vision"],
        "vision_per_view": ms["vision"] / views if views else 0.0,
        "prefill": ms["prefill"],
        "prefill_tok_s": prefill_tokens / ms["prefill"] if ms["prefill"] else 0.0,
        "ttft": ms["ttft"],
        "decode": ms["decode"],
        "decode_tok_s": decode_tokens / ms["decode"] if decode_tokens and ms["decode"] else 0.0,
        "e2e": ms["ttft"] + ms["decode"],
    }
    return {
        "text": answer,
        "token_ids": ids,
        "stop_reason": f.get("stop"),
        "views": views,
        "prompt_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "threads": threads,
        "load_s": ms["load"],
        "peak_rss_mib": peak_kb / 2**10,
        "stages": stages,
    }
