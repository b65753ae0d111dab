"""A benchmark result as markdown tables, a JSON file and a PNG chart (time to first token by stage)."""

from __future__ import annotations

import json
from pathlib import Path

from sphinx_edge.benchmarks.system import int8_features
from sphinx_edge.io import atomic_path, write_text_atomic

STACK = ("preprocess", "vision", "prefill")  # the stages that add up to time to first token


def _ms(stage: dict) -> str:
    med, lo, hi = (1e3 * stage[k] for k in ("median", "min", "max"))
    return f"{med:.1f} ({lo:.1f}–{hi:.1f})" if stage["n"] > 1 else f"{med:.1f}"


def _rate(stage: dict) -> str:
    return f"{stage['median']:.1f}"


def _mean_sd(stage: dict) -> str:
    """llama-bench's figure: mean ± sample stddev over the repetitions."""
    return f"{stage['mean']:.1f} ± {stage['stddev']:.1f}" if stage.get("n", 1) > 1 else f"{stage['mean']:.1f}"


def _threads(row: dict) -> str:
    return str(row.get("threads") or "–")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _label(case: dict, result: dict) -> str:
    """backend, LLM quantization (with its int4 block / group size), the vision encoder's if it differs;
    the export's folder too when the run covers several (two exports may share all of that)."""
    group = f" g{case['group_size']}" if case["quant"] == "int4" and case.get("group_size") else ""
    label = f"{case['backend']} {case['quant']}{group}" + (
        f"/vis {case['vision_quant']}" if case["vision_quant"] != case["quant"] else "")
    folders = {c.get("export_dir") for c in result.get("cases", []) if c.get("export_dir") not in (None, "-")}
    return f"{label} ({Path(case['export_dir']).name})" if len(folders) > 1 and case.get("export_dir") in folders else label


def stage_table(result: dict) -> str:
    """One row per (case, image, layout): the stage medians (ms, min–max) and rates."""
    head = ("| backend / quant | threads | image | layout | views (budget) | image tok | preprocess ms | vision ms (per view) | "
            "prefill ms (tok/s) | TTFT ms | decode tok/s | end to end ms | peak RSS MiB | artifacts MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in result["cases"]:
        for row in case["images"]:
            s = row["stages"]
            lines.append(
                f"| {_label(case, result)} | {_threads(case)} | {Path(row['image']).name} | {row['layout']}"
                f"{' pipelined' if row.get('pipelined') else ''} | {row['views']}{_budget(row)} | "
                f"{row['image_tokens']} | {_ms(s['preprocess']) if 'preprocess' in s else 'on host'} | {_ms(s['vision'])} "
                f"({1e3 * s['vision_per_view']['median']:.1f}) | {_ms(s['prefill'])} ({_rate(s['prefill_tok_s'])}) | "
                f"{_ms(s['ttft'])} | {_rate(s['decode_tok_s'])} | {_ms(s['e2e'])} | {case['peak_rss_mib']:.0f} | "
                f"{_mib(case['artifact_bytes'])} |")
    return "\n".join(lines)


def _budget(row: dict) -> str:
    return f" (max {row['max_views']})" if row.get("max_views") else ""


def memory_table(result: dict) -> str:
    """Peak RSS per stage of each case, and the whole case's against the bytes of what it loads."""
    stages = ("load", "vision", "prefill", "decode", "llm alone")
    head = ("| backend / quant | threads | " + " | ".join(f"{s} MiB" for s in stages) +
            " | peak MiB | artifacts MiB | peak / artifacts |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in result["cases"]:
        per = case.get("stage_peak_rss_mib") or {}
        cells = [f"{per[s]:.0f}" if per.get(s) is not None else "–" for s in stages]
        # The torch row loads the PyTorch model, not the export's files: no ratio to them.
        ratio = (case["peak_rss_mib"] * 2**20 / case["artifact_bytes"]
                 if case.get("artifact_bytes") and case["backend"] != "torch" else None)
        lines.append(f"| {_label(case, result)} | {_threads(case)} | " + " | ".join(cells) +
                     f" | {case['peak_rss_mib']:.0f} | {_mib(case['artifact_bytes'])} | "
                     f"{f'{ratio:.2f}x' if ratio else '–'} |")
    return "\n".join(lines)


def llm_table(result: dict) -> str:
    """llama-bench style pp / tg per case (tokens/s, mean ± stddev), with decode as a fraction of the
    memory-bandwidth bound."""
    bw = result.get("bandwidth_gb_s")
    lines = ["| backend / quant | threads | pp tok/s | tg tok/s | LLM weights read per token MiB | "
             "tg x weights / read bandwidth | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for case in result["cases"]:
        llm = case.get("llm")
        if not llm:
            continue
        read = case["decode_weight_bytes"]
        frac = f"{llm['tg_tok_s']['mean'] * read / (bw * 1e9):.0%}" if bw else "–"
        lines.append(f"| {_label(case, result)} | {_threads(case)} | pp{llm['pp_tokens']}: {_mean_sd(llm['pp_tok_s'])} | "
                     f"tg{llm['tg_tokens']}: {_mean_sd(llm['tg_tok_s'])} | {_mib(read)} | {frac} | "
                     f"{case['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def peer_table(result: dict) -> str:
    """Our LLM rows next to the peers' on the same shape, each as a ratio to the fastest peer (means)."""
    peers = result.get("peers") or []
    if not peers:
        return ""
    best_pp = max(p["pp_tok_s"]["mean"] for p in peers)
    best_tg = max(p["tg_tok_s"]["mean"] for p in peers)
    rows = [(_label(c, result), c["llm"], None, c) for c in result["cases"] if c.get("llm")]
    rows += [(p["peer"], p, p["artifact_bytes"], p) for p in peers]
    lines = ["| runtime / quant | threads | pp tok/s | vs best peer | tg tok/s | vs best peer | peer model MiB | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for label, llm, size, row in rows:
        pp, tg = llm["pp_tok_s"]["mean"], llm["tg_tok_s"]["mean"]
        lines.append(f"| {label} | {_threads(row)} | pp{llm['pp_tokens']}: {_mean_sd(llm['pp_tok_s'])} | "
                     f"{pp / best_pp:.2f}x | tg{llm['tg_tokens']}: {_mean_sd(llm['tg_tok_s'])} | {tg / best_tg:.2f}x | "
                     f"{_mib(size) if size else '–'} | {row['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def llm_records(result: dict) -> list[dict]:
    """One record per LLM-alone test (ppN or tgN) of every case and peer, with llama-bench's field
    names where it has one: the rows of `-o jsonl` and `-o csv`."""
    m = result["machine"]
    rows = [(_label(c, result), c) for c in result["cases"] if c.get("llm")]
    rows += [(p["peer"], p) for p in result.get("peers") or []]
    records = []
    for label, row in rows:
        llm = row["llm"] if "llm" in row else row
        for test, key, n_prompt, n_gen in (("pp", "pp_tok_s", llm["pp_tokens"], 0), ("tg", "tg_tok_s", 0, llm["tg_tokens"])):
            t = llm[key]
            records.append({"runtime": label, "model": row.get("model") or row.get("shape"), "threads": row.get("threads"),
                            "test": f"{test}{n_prompt or n_gen}", "n_prompt": n_prompt, "n_gen": n_gen,
                            "avg_ts": t["mean"], "stddev_ts": t["stddev"], "samples_ts": t["samples"],
                            "peak_rss_mib": row.get("peak_rss_mib"), "cpu_info": m["cpu"], "date": result["date"]})
    return records


def csv_text(records: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "samples_ts": " ".join(f"{x:.3f}" for x in r["samples_ts"])})
    return buf.getvalue()


def render(result: dict, fmt: str) -> str:
    """The result in `-o` format: md (the tables), json (everything), jsonl / csv (the LLM-alone tests)."""
    if fmt not in RENDERERS:
        raise ValueError(f"unknown output format {fmt!r}; choose {', '.join(RENDERERS)}")
    return RENDERERS[fmt](result)


def _change(new: dict, old: dict) -> str:
    """The relative change of the medians, or "within noise" when the two runs' ranges overlap."""
    if new["n"] > 1 and old["n"] > 1 and new["min"] <= old["max"] and old["min"] <= new["max"]:
        return f"within noise ({new['median'] / old['median'] - 1:+.0%})"
    return f"{new['median'] / old['median'] - 1:+.0%}"


def skip_table(result: dict) -> str:
    """Time to first token with skip tokens (sphinx-x) against every tile encoded (sphinx-1k), per image."""
    lines = ["| backend / quant | threads | image | TTFT skip tokens ms | TTFT all tiles ms | change |",
             "|---|---|---|---|---|---|"]
    for case in result["cases"]:
        by = {(r["image"], r["layout"], r.get("max_views")): r for r in case["images"]}
        for (image, layout, budget), row in by.items():
            other = by.get((image, "sphinx-1k", budget))
            if layout != "sphinx-x" or other is None:
                continue
            a, b = row["stages"]["ttft"], other["stages"]["ttft"]
            lines.append(f"| {_label(case, result)} | {_threads(case)} | {Path(image).name}{_budget(row)} | {_ms(a)} | {_ms(b)} | "
                         f"{_change(a, b)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown(result: dict) -> str:
    m = result["machine"]
    bw = result.get("bandwidth_gb_s")
    threads = f"; {result['threads']} threads for every runtime" if result.get("threads") else ""
    features = int8_features(m)
    int8 = f" (int8 on {', '.join(features)})" if features else ""
    parts = [f"Machine: {m['cpu']}{int8}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; {result['date']}"
             + (f"; read bandwidth {bw:.1f} GB/s ({result.get('bandwidth_kind', '')}: "
                f"{' and '.join(f'{x:.1f}' for x in result.get('bandwidth_samples_gb_s', [bw]))})" if bw else "")
             + threads]
    if any(c["images"] for c in result["cases"]):
        parts += ["", stage_table(result)]
    if any(c.get("llm") for c in result["cases"]):
        parts += ["", llm_table(result)]
    if result["cases"]:
        parts += ["", memory_table(result)]
    for table in (peer_table(result), skip_table(result)):
        if table:
            parts += ["", table]
    for s in result.get("skipped", []):
        parts.append(f"\nnot run: {s['backend']} on {s['export_dir']}: {s['why']}")
    return "\n".join(parts)


def save_json(result: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(result, indent=1))


def save_chart(result: dict, path: Path) -> None:
    """A stacked horizontal bar per (case, image, layout): preprocess, vision, prefill (ms)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("the PNG chart needs matplotlib: pip install 'sphinx-edge[bench]'") from e
    rows = [(f"{_label(c, result)} · {Path(r['image']).stem} · {r['layout']}", r["stages"]) for c in result["cases"]
            for r in c["images"]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for stage in STACK:
        widths = [1e3 * s[stage]["median"] if stage in s else 0.0 for _, s in rows]  # android: no preprocess
        ax.barh(range(len(rows)), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time to first token, ms (median)")
    ax.legend(loc="lower right")
    ax.set_title(f"time to first token by stage — {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


RENDERERS = {
    "md": markdown,
    "json": lambda result: json.dumps(result, indent=1),
    "jsonl": lambda result: "\n".join(json.dumps(r) for r in llm_records(result)),
    "csv": lambda result: csv_text(llm_records(result)),
}
OUTPUT_FORMATS = tuple(RENDERERS)
