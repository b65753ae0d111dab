"""What the machine is and what it can do: a description for result tables, peak RSS, and the
memory bandwidth that bounds decode speed (every weight is read once per generated token)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

import numpy as np


def describe() -> dict:
    """CPU model, core count, memory and OS: enough to tell two result tables apart."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(mem_gib, 1) if mem_gib else None, "os": platform.platform(),
            "python": sys.version.split()[0]}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far. On Linux from VmHWM: getrusage's ru_maxrss
    carries the parent's peak across fork + exec, so a small case started by a big process would
    report the parent's figure."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS reports bytes, Linux KiB


def memory_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second), median of `repeats` copies
    of a buffer far larger than any cache."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages first
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        speeds.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(speeds)
