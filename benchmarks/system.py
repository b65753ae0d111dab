"""What the machine is and what it can do: a description for result tables, peak RSS, and the
memory bandwidth that bounds decode speed (every weight is read once per generated token)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sphinx_edge.rss import peak_rss_mib, reset_peak_rss


# The CPU features that int8 matrix products run on, as a result table names them: how fast int8 and
# int4 weights multiply depends on them more than on the clock (onnxruntime's int8 GEMM is 13.8x its
# int4 one with AMX; benchmarks/RESULTS.md, "First answer on a CPU with AMX").
INT8_FEATURES: dict[str, str] = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX",
                                 "asimddp": "Arm dot product", "i8mm": "Arm i8mm"}


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU ([] where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        cpus.append({k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())})
    return cpus


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads not counted): the default thread count
    of every runtime in a benchmark, as llama.cpp and onnxruntime choose for themselves."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = {(c.get("physical id", "0"), c.get("core id", c.get("processor"))) for c in _cpuinfo()
             if int(c.get("processor", -1)) in allowed}
    return max(1, len(cores) or len(allowed))


def describe() -> dict:
    """CPU model, flags, core counts, memory and OS: enough to tell two result tables apart."""
    info = _cpuinfo()
    cpu = next((c["model name"] for c in info if "model name" in c), platform.processor() or platform.machine())
    flags = next((c.get("flags", c.get("Features", "")) for c in info), "").split()
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "amx_tile",
                        "neon", "asimd", "sve", *INT8_FEATURES) if f in flags]
    mem_gib = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cpu_flags": simd,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "physical_cores": physical_cores(), "memory_gib": round(mem_gib, 1) if mem_gib else None,
            "os": platform.platform(), "python": sys.version.split()[0]}


def int8_features(machine: dict) -> list[str]:
    """The int8 matrix-product features among a `describe()`'s flags, by name (none for a phone's
    description, which lists no flags)."""
    flags = machine.get("cpu_flags") or []
    return [name for flag, name in INT8_FEATURES.items() if flag in flags]


def runtime_versions() -> dict[str, str]:
    """Versions of every runtime a benchmark may run (those installed)."""
    from sphinx_edge.versions import installed_versions

    return installed_versions(("sphinx-edge", "onnxruntime", "executorch", "torch", "llama-cpp-python",
                               "onnxruntime-genai", "numpy"))


class StagePeaks:
    """Peak RSS per named stage of a run, and the whole run's. Linux lets a process reset its own
    high-water mark (writing 5 to /proc/self/clear_refs), so each stage's peak is its own and not
    the largest before it; elsewhere only the whole run's peak is known (stage peaks are None)."""

    def __init__(self) -> None:
        self.stages: dict[str, float | None] = {}
        self.overall = peak_rss_mib()

    def measure(self, stage: str, fn, *args):
        """`fn(*args)`, its peak RSS counted for `stage` (the largest of every call under that name)."""
        self.overall = max(self.overall, peak_rss_mib())  # the peak so far, before a reset forgets it
        resettable = reset_peak_rss()
        try:
            return fn(*args)
        finally:
            peak = peak_rss_mib()
            self.overall = max(self.overall, peak)
            known = self.stages.get(stage, 0.0)
            self.stages[stage] = max(known, peak) if resettable and known is not None else None

    def peak(self) -> float:
        return max(self.overall, peak_rss_mib())


def memory_bandwidth(threads: int | None = None, mib: int = 1024, repeats: int = 15) -> float:
    """Read bandwidth in GB/s with `threads` threads (default: the physical cores), each taking the
    maximum of its own slice of a buffer far larger than any cache: what decoding does with the
    weights, so "weight bytes per token x tokens/s / this" is the fraction of the limit a decoder
    reaches. The median of `repeats` passes: on a shared VM the best pass was an outlier (65 GB/s
    once, against a usual 35-42 here). numpy releases the GIL inside the
    reduction, so the threads run together. `max` rather than `sum`: numpy's pairwise sum is
    compute-bound at about 18 GB/s a core here, well below what one core can read (measured on
    dev-cpu, 2 threads: sum 33, max 40, BLAS gemv 38-41 GB/s; benchmarks/RESULTS.md)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or physical_cores()
    data = np.ones(mib * 2**20 // 8, dtype=np.float64)  # written once: every page is resident
    slices = np.array_split(data, threads)
    speeds = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, slices))  # warm up the threads
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, slices))
            speeds.append(data.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(speeds)
