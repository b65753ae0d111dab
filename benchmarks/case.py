"""One benchmark case (one export directory on one backend), run in its own process so that its
peak RSS is its own: `python -m sphinx_edge.benchmarks.case SPEC_JSON` prints a JSON result.

SPEC_JSON: {"export_dir", "backend" (onnx | pte | torch), "images": [paths], "layouts": [names or
null], "view_budgets": [max views or null], "pipelined", "prompt", "decode_tokens", "pp", "tg",
"warmup", "repeats", "threads", "llm_only"}. With "llm_only" the image stages are skipped and only
pp / tg run (all `repeats` of them). Peak RSS is reported for the whole case and per stage (load,
vision, prefill, decode; per stage where the system lets a process reset its peak, and not with
"pipelined", whose stages overlap).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sphinx_edge.benchmarks.stages import MeteredBackend, time_image, time_llm
from sphinx_edge.benchmarks.system import StagePeaks
from sphinx_edge.runtime.manifest import graph_files, read_manifest
from sphinx_edge.runtime.pipeline import Pipeline


def artifact_bytes(manifest: dict, backend: str) -> int:
    """Bytes on disk of what a backend loads (the graphs; the PyTorch reference counts fp32 weights)."""
    if backend == "torch":
        from sphinx_edge.config import SphinxConfig, parameter_counts

        return 4 * parameter_counts(SphinxConfig.from_dict(manifest["model"]["config"]))["total"]
    names = [f for fs in graph_files(manifest, backend).values() for f in fs]
    return sum(manifest["files"][n]["bytes"] for n in names)


def open_pipeline(export_dir: Path, backend: str, threads: int | None) -> Pipeline:
    if backend == "torch":
        from sphinx_edge.benchmarks.torch_backend import TorchBackend, source_model

        model = source_model(read_manifest(export_dir), export_dir)
        return Pipeline(export_dir, TorchBackend(model, threads))
    return Pipeline(export_dir, backend, threads=threads)


def run_case(spec: dict) -> dict:
    export_dir = Path(spec["export_dir"])
    peaks = StagePeaks()
    t0 = time.perf_counter()
    pipeline = peaks.measure("load", open_pipeline, export_dir, spec["backend"], spec.get("threads"))
    load_s = time.perf_counter() - t0
    pipeline.pipelined = spec.get("pipelined", False)
    if not pipeline.pipelined:  # overlapping stages cannot each have their own peak
        pipeline.backend = MeteredBackend(pipeline.backend, peaks)
    manifest = pipeline.manifest
    rows = []
    llm_only = spec.get("llm_only", False)
    for image in [] if llm_only else spec["images"]:
        for layout in spec["layouts"]:
            for budget in spec.get("view_budgets") or [None]:
                pipeline.max_views = budget
                row = time_image(pipeline, image, spec["prompt"], layout=layout,
                                 decode_tokens=spec["decode_tokens"], warmup=spec["warmup"], repeats=spec["repeats"])
                rows.append({"image": str(image), "layout": layout or pipeline.config.layout, "max_views": budget,
                             "pipelined": pipeline.pipelined, **row})
    if isinstance(pipeline.backend, MeteredBackend):
        pipeline.backend = pipeline.backend.unwrapped
    llm = peaks.measure("llm alone", time_llm, pipeline, spec["pp"], spec["tg"], spec["warmup"],
                        spec["repeats"] if llm_only else max(1, min(spec["repeats"], 3))) \
        if spec["pp"] or spec["tg"] else None
    return {
        "export_dir": str(export_dir),
        "backend": spec["backend"],
        "model": manifest["model"]["name"],
        "quant": "fp32" if spec["backend"] == "torch" else manifest["quantization"]["quant"],
        "vision_quant": "fp32" if spec["backend"] == "torch" else manifest["quantization"]["vision"],
        "group_size": manifest["quantization"].get("group_size"),
        "artifact_bytes": artifact_bytes(manifest, spec["backend"]),
        "threads": getattr(pipeline.backend, "threads", None) or spec.get("threads"),
        "load_s": load_s,
        "images": rows,
        "llm": llm,
        "peak_rss_mib": peaks.peak(),
        "stage_peak_rss_mib": peaks.stages,
    }


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m sphinx_edge.benchmarks.case SPEC_JSON")
    result = run_case(json.loads(argv[0]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
