"""Handing freed memory back to the operating system between export stages."""

from __future__ import annotations

import gc

from sphinx_edge.processes import release_free_memory


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS: glibc keeps freed mid-size
    blocks (weights under its 32 MB mmap threshold) in the heap, so without the trim a dropped
    model would still count in the process's memory while the next stage loads its graphs."""
    gc.collect()
    release_free_memory()
