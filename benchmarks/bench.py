"""The benchmark matrix: export directories (one per quantization) x backends x images x layouts x
view budgets.

Each (export, backend) pair runs in a fresh process (`benchmarks.case`), one after the other, so
peak memory is measured per case and no case warms another's caches. Targets other than this
machine need their hardware; when it is absent they say so and run nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

from sphinx_edge.benchmarks.system import describe, memory_bandwidth, physical_cores, runtime_versions
from sphinx_edge.config import SphinxConfig, parameter_counts
from sphinx_edge.runtime.manifest import read_manifest

BACKENDS = ("torch", "onnx", "pte")  # `--format`: the PyTorch reference, or one of the export's formats
# `--skip-tokens`: the layouts each image is run with (None: the model's own).
SKIP_TOKENS = {"on": [None], "off": ["sphinx-1k"], "both": [None, "sphinx-1k"]}
# Bytes of a linear weight that decoding reads per token, by quantization (int4: 4-bit values
# plus one fp32 scale per group).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0}


class CaseFailed(RuntimeError):
    pass


class BenchError(ValueError):
    """A benchmark that cannot be run as asked: said before anything runs."""


@dataclass
class BenchSpec:
    export_dirs: list[Path]
    backends: list[str]
    images: list[Path]
    layouts: list[str | None]  # None = the model's own
    view_budgets: list[int | None] = field(default_factory=lambda: [None])  # `--max-views`; None: every view
    pipelined: bool = False  # the next view encoded while the last one prefills
    prompt: str = "What is in the image?"
    decode_tokens: int = 32
    pp: int = 512
    tg: int = 128
    warmup: int = 1
    repeats: int = 5
    threads: int | None = None  # one count for every runtime; None: the physical cores
    llm_only: bool = False  # only the LLM-alone pp / tg figures (no image stages)
    bandwidth: bool = True
    peers: list[str] = field(default_factory=list)  # of peers.PEERS, on the exports' LLM shape
    peers_dir: Path | None = None  # where the peers' models are written and cached
    target: str = "local"  # of targets.TARGETS
    runner_dir: Path | None = None  # android: sphinx_runner built with the NDK, and its .so files

    def __post_init__(self) -> None:
        from sphinx_edge.benchmarks.peers import PEERS

        unknown = [b for b in self.backends if b not in BACKENDS] + [p for p in self.peers if p not in PEERS]
        if unknown:
            raise BenchError(f"unknown --format or --peer {', '.join(map(repr, unknown))}; formats: "
                             f"{', '.join(BACKENDS)}; peers: {', '.join(PEERS)}")
        if (self.llm_only or self.peers) and not self.pp and not self.tg:
            raise BenchError(f"{'--llm-only' if self.llm_only else '--peer'} times the LLM alone: give --pp and/or "
                             "--tg above 0")
        if any(b is not None and b < 1 for b in self.view_budgets):
            raise BenchError(f"--max-views counts the global view: at least 1, got {self.view_budgets}")
        missing = [str(p) for p in self.images if not Path(p).is_file()]
        if missing:
            raise BenchError(f"no image at {', '.join(missing)}")


def decode_weight_bytes(config: SphinxConfig, quant: str, group_size: int = 32) -> float:
    """Weight bytes one decode step reads: every LLM linear (the output head included); the
    embedding table is read one row per token, so it is left out."""
    llm = config.llm
    linear = parameter_counts(config)["llm"] - llm.vocab_size * llm.dim - (2 * llm.n_layers + 1) * llm.dim
    per_weight = WEIGHT_BYTES.get(quant, 0.5 + 4 / group_size)
    return linear * per_weight


def _run_module(module: str, spec: dict, what: str) -> dict:
    """`python -m module SPEC_JSON` in a fresh process; its last stdout line is the JSON result."""
    # -P: the case imports this very package, not a `sphinx_edge` folder in the working directory (a
    # checkout's source tree, run from with the wheel installed, lacks the mapped subpackages).
    proc = subprocess.run([sys.executable, "-P", "-m", module, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CaseFailed(f"{what} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_subprocess(spec: BenchSpec, export_dir: Path, backend: str) -> dict:
    case = {"export_dir": str(export_dir), "backend": backend, "images": [str(p) for p in spec.images],
            "layouts": spec.layouts, "view_budgets": spec.view_budgets, "pipelined": spec.pipelined, "prompt": spec.prompt, "decode_tokens": spec.decode_tokens, "pp": spec.pp,
            "tg": spec.tg, "warmup": spec.warmup, "repeats": spec.repeats, "threads": spec.threads,
            "llm_only": spec.llm_only}
    return _run_module("sphinx_edge.benchmarks.case", case, f"{backend} on {export_dir}")


def run_peer_in_subprocess(peer: str, config: SphinxConfig, spec: BenchSpec) -> dict:
    case = {"peer": peer, "llm": asdict(config.llm), "work_dir": str(spec.peers_dir or default_peers_dir()),
            "pp": spec.pp, "tg": spec.tg, "warmup": spec.warmup, "repeats": spec.repeats, "threads": spec.threads}
    return _run_module("sphinx_edge.benchmarks.peers", case, peer)


def default_peers_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sphinx-edge" / "peers"


def run_peers(spec: BenchSpec, configs: list[SphinxConfig], on_case: Callable[[str], None] | None = None
              ) -> tuple[list[dict], list[dict]]:
    """Each requested peer on each distinct LLM shape among the exports: (results, skipped with why)."""
    from sphinx_edge.benchmarks.peers import PeerUnavailable, check_peer

    results, skipped, shapes = [], [], {}
    for config in configs:
        shapes.setdefault(json.dumps(asdict(config.llm), sort_keys=True), config)
    for config in shapes.values():
        for peer in spec.peers:
            try:
                check_peer(peer)
                if on_case:
                    on_case(f"peer {peer}")
                results.append(run_peer_in_subprocess(peer, config, spec))
            except (PeerUnavailable, CaseFailed) as e:
                skipped.append({"export_dir": "-", "backend": peer, "why": str(e)})
    return results, skipped


def _settings(spec: BenchSpec) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k in ("export_dirs", "images") else v)
            for k, v in asdict(spec).items()}


def run_matrix(spec: BenchSpec, on_case: Callable[[str], None] | None = None) -> dict:
    """Every (export, backend) case on this machine; the PyTorch reference runs once per model, not
    per export. Returns the whole result (machine, settings, cases, skipped cases with why)."""
    if spec.threads is None:  # every runtime gets the same count, whatever its own default would be
        spec = replace(spec, threads=physical_cores())
    cases, skipped, torch_done = [], [], set()
    bandwidth = [_measure_bandwidth(spec, on_case)] if spec.bandwidth else []
    for export_dir in spec.export_dirs:
        manifest = read_manifest(export_dir)
        for backend in spec.backends:
            if backend == "torch":
                key = (manifest["model"]["name"], json.dumps(manifest.get("source", {}), sort_keys=True))
                if key in torch_done:
                    continue
                torch_done.add(key)
            elif backend not in manifest["graphs"]:
                skipped.append({"export_dir": str(export_dir), "backend": backend,
                                "why": f"the export has no {backend} graphs"})
                continue
            if on_case:
                on_case(f"{backend} {manifest['quantization']['quant'] if backend != 'torch' else 'fp32'} "
                        f"({export_dir.name})")
            try:
                result = run_in_subprocess(spec, export_dir, backend)
            except CaseFailed as e:
                skipped.append({"export_dir": str(export_dir), "backend": backend, "why": str(e)})
                continue
            config = SphinxConfig.from_dict(manifest["model"]["config"])
            result["decode_weight_bytes"] = decode_weight_bytes(config, result["quant"], result["group_size"] or 32)
            cases.append(result)
    configs = [SphinxConfig.from_dict(read_manifest(d)["model"]["config"]) for d in spec.export_dirs]
    peers, peers_skipped = run_peers(spec, configs, on_case) if spec.peers else ([], [])
    skipped += peers_skipped
    if spec.bandwidth:
        bandwidth.append(_measure_bandwidth(spec, on_case))
    return {"date": date.today().isoformat(), "machine": describe(), "versions": runtime_versions(),
            "threads": spec.threads, "bandwidth_gb_s": max(bandwidth) if bandwidth else None,
            "bandwidth_samples_gb_s": bandwidth,
            "bandwidth_kind": f"read, {spec.threads} threads, median of 15 passes; the higher of one measurement "
                              "before the cases and one after",
            "settings": _settings(spec), "cases": cases, "peers": peers, "skipped": skipped}


def _measure_bandwidth(spec: BenchSpec, on_case: Callable[[str], None] | None) -> float:
    """Measured before and after the cases: on a shared host the read bandwidth moved by a quarter
    within minutes (30.0 against 23.7 GB/s, benchmarks/RESULTS.md), and the limit is the higher."""
    if on_case:
        on_case("memory bandwidth")
    return memory_bandwidth(spec.threads)
