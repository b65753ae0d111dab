"""Handing freed memory back to the operating system between export stages."""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS: glibc keeps freed mid-size
    blocks (weights under its 32 MB mmap threshold) in the heap, so without the trim a dropped
    model would still count in the process's memory while the next stage loads its graphs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
