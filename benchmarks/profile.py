"""Where the LLM's time goes: one prefill of `pp` tokens and `tg` decode steps under the runtime's
own profiler (onnxruntime's, ExecuTorch's ETDump), grouped by operator.

Each row is an operator type (onnx) or an event of the program (pte: a delegate call, a portable or
custom kernel) with its milliseconds per prefill and per decoded token and its share of each; the
last rows are the time outside the operators inside the runtime's run call, and the time outside
the run call in Python (binding inputs, copying logits out). Profiling adds its own overhead: the
shares are what the profile is for, the absolute times are `bench`'s.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from sphinx_edge.runtime.backends import BACKENDS
from sphinx_edge.runtime.manifest import graph_files
from sphinx_edge.runtime.pipeline import Pipeline

OUTSIDE_OPS = "(runtime, outside the operators)"
OUTSIDE_RUN = "(Python, outside the run call)"
DELEGATE = "XNNPACK delegate calls (linears, norms, RoPE, ...)"


def profile_llm(export_dir: Path, backend: str, *, pp: int = 512, tg: int = 64, threads: int | None = None,
                seed: int = 0) -> dict:
    """{"backend", "threads", "pp", "tg", "rows": [{"op", "prefill_ms", "decode_ms", ...}], "wall": {...}}."""
    meta = Pipeline(export_dir, None)
    engine = BACKENDS[backend](Path(export_dir), graph_files(meta.manifest, backend), meta.config, threads, profile=True)
    embeds = engine.embed(np.random.default_rng(seed).integers(0, meta.config.llm.vocab_size, pp))
    token = engine.embed(np.array([1]))
    engine.forward(embeds[:8])  # warm-up: first-run allocations and prepacking stay out of the figures
    engine.truncate(0)
    walls = []
    for x in [embeds, *[token] * tg]:
        t0 = time.perf_counter()
        engine.forward(x)
        walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "profile"
        engine.write_profile(trace)
        runs = READERS[backend](trace)[-(tg + 1):]  # per run: {op: seconds}; the warm-up run dropped
    prefill, decode = runs[0], _mean(runs[1:])
    for run_ops, wall in ((prefill, walls[0]), (decode, float(np.mean(walls[1:])))):
        run_ops[OUTSIDE_RUN] = max(0.0, wall - run_ops.pop("(run)"))
    ops = sorted(set(prefill) | set(decode), key=lambda op: -decode.get(op, 0.0))
    total_p, total_d = sum(prefill.values()), sum(decode.values())
    rows = [{"op": op, "prefill_ms": 1e3 * prefill.get(op, 0.0), "prefill_share": prefill.get(op, 0.0) / total_p,
             "decode_ms": 1e3 * decode.get(op, 0.0), "decode_share": decode.get(op, 0.0) / total_d} for op in ops]
    return {"backend": backend, "threads": engine.threads, "pp": pp, "tg": tg, "rows": rows,
            "wall": {"prefill_ms": 1e3 * walls[0], "decode_ms_per_token": 1e3 * float(np.mean(walls[1:]))}}


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for run in runs:
        for op, seconds in run.items():
            total[op] += seconds / len(runs)
    return dict(total)


def read_onnxruntime_trace(path: Path) -> list[dict[str, float]]:
    """Per `model_run` of the decoder: seconds per operator type, OUTSIDE_OPS and "(run)" (the whole call)."""
    events = json.loads(path.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    out = []
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        ops: dict[str, float] = defaultdict(float)
        for node in nodes:
            if start <= node["ts"] <= end:
                ops[node["args"]["op_name"]] += node["dur"] * 1e-6
        ops[OUTSIDE_OPS] = max(0.0, run["dur"] * 1e-6 - sum(ops.values()))
        ops["(run)"] = run["dur"] * 1e-6
        out.append(dict(ops))
    return out


def read_etdump(path: Path) -> list[dict[str, float]]:
    """Per run of the decoder: seconds per kernel outside the delegate (portable and custom
    kernels), DELEGATE (every XNNPACK call together: the pip wheel's XNNPACK records its operators
    with no time to speak of, so they are not split), OUTSIDE_OPS (kernel dispatch) and "(run)"
    (the method's whole execution). ETDump keeps one block of events per method; each
    event holds one time per run. `profile_llm` runs the embedding and the decoder only, so the
    decoder's block is the larger one."""
    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no debug buffer: tensor values are not wanted here
        blocks = [b for b in Inspector(etdump_path=str(path)).event_blocks if b.name == "Execute"]
    decoder = max(blocks, key=lambda b: len(b.events))
    n_runs = max(len(e.perf_data.raw) for e in decoder.events if e.perf_data)
    runs: list[dict[str, float]] = [defaultdict(float) for _ in range(n_runs)]
    wholes = [0.0] * n_runs
    for event in decoder.events:
        for i, ms in enumerate(event.perf_data.raw if event.perf_data else []):
            if event.name == "Method::execute":
                wholes[i] = ms * 1e-3
            elif event.name == "DELEGATE_CALL":
                runs[i][DELEGATE] += ms * 1e-3
            elif event.name != "OPERATOR_CALL" and not event.is_delegated_op:  # a wrapper; see DELEGATE
                runs[i][event.name] += ms * 1e-3
    for ops, whole in zip(runs, wholes):
        ops[OUTSIDE_OPS] = max(0.0, whole - sum(ops.values()))
        ops["(run)"] = whole
    return [dict(ops) for ops in runs]


READERS = {"onnx": read_onnxruntime_trace, "pte": read_etdump}


def markdown(result: dict) -> str:
    head = (f"{result['backend']}, {result['threads']} threads: prefill {result['pp']} tokens "
            f"{result['wall']['prefill_ms']:.0f} ms, decode {result['wall']['decode_ms_per_token']:.2f} ms/token "
            f"(mean of {result['tg']}, profiler on)\n\n")
    lines = ["| operator | prefill ms | share | decode ms/token | share |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['prefill_ms']:.1f} | {100 * r['prefill_share']:.1f} % | "
                     f"{r['decode_ms']:.3f} | {100 * r['decode_share']:.1f} % |")
    return head + "\n".join(lines) + "\n"
