"""A process's resident memory: its peak so far, and (Linux) a reset of that peak, so that a stage
of a longer run can be measured on its own. Torch-free."""

from __future__ import annotations

import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size so far. On Linux from VmHWM: getrusage's ru_maxrss
    carries the parent's peak across fork + exec, so a small case started by a big process would
    report the parent's figure."""
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS reports bytes, Linux KiB


def rss_mib() -> float | None:
    """This process's resident set size now (None where /proc is missing)."""
    now = _status_kib("VmRSS")
    return None if now is None else now / 2**10


def reset_peak_rss() -> bool:
    """Sets this process's peak back to what it holds now (Linux: 5 into /proc/self/clear_refs);
    False where that cannot be done, and the peak stays the whole life's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
