"""Memory of an export: freed memory handed back between stages, and weights kept in a scratch file."""

from __future__ import annotations

import gc
import math
import mmap
import os
import tempfile
from typing import TYPE_CHECKING

from sphinx_edge.processes import drop_mapped_pages, release_free_memory


if TYPE_CHECKING:  # the exporting process imports this module and stays torch-free
    import torch


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS: glibc keeps freed mid-size
    blocks (weights under its 32 MB mmap threshold) in the heap, so without the trim a dropped
    model would still count in the process's memory while the next stage loads its graphs."""
    gc.collect()
    release_free_memory()


class ScratchWeights:
    """Parameters kept in a scratch file (shared memory mappings of it) instead of the process's memory,
    for a stage that only writes the weights out again: the ONNX graphs. After each parameter is filled
    (`written`) and after each initializer is saved, the pages go back to the kernel's page cache, which
    writes them to disk or keeps them as it sees fit; a later read faults them in again. SPHINX-Tiny's
    vision graph was written with 7.6 GB of fp32 weights resident (benchmarks/RESULTS.md, "Export on a
    laptop (issue 22, third part)").

    The file is unlinked as soon as it is made (nothing stays behind, whatever happens) and its blocks
    are allocated as parameters arrive, so a full disk is an OSError, not a crash on a mapped write.
    The mappings live as long as the tensors that view them."""

    CHUNK = 1 << 30  # one mapping per GiB of weights (a larger parameter gets a chunk of its own)
    ALIGN = 64

    def __init__(self, folder: str | os.PathLike) -> None:
        fd, path = tempfile.mkstemp(dir=folder, prefix=".weights-")
        os.unlink(path)
        self._fd, self._size = fd, 0
        self._chunks: list[list] = []  # [bytes view (uint8 tensor), used bytes]

    def new(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if not self._chunks or self._chunks[-1][1] + nbytes > self._chunks[-1][0].numel():
            self._grow(max(self.CHUNK, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE))
        chunk = self._chunks[-1]
        start = chunk[1]
        chunk[1] = -(-(start + nbytes) // self.ALIGN) * self.ALIGN
        if nbytes:
            os.posix_fallocate(self._fd, self._size - chunk[0].numel() + start, nbytes)
        return chunk[0][start:start + nbytes].view(dtype).view(shape)

    def _grow(self, length: int) -> None:
        import torch

        os.ftruncate(self._fd, self._size + length)
        mapping = mmap.mmap(self._fd, length, offset=self._size)
        self._size += length
        self._chunks.append([torch.frombuffer(mapping, dtype=torch.uint8), 0])

    def written(self) -> None:
        """Hands the resident pages back (the data stays in the file and the page cache)."""
        drop_mapped_pages([(view.data_ptr(), view.data_ptr() + view.numel()) for view, _ in self._chunks])

    def close(self) -> None:
        self.written()
        self._chunks.clear()
        os.close(self._fd)

    def __enter__(self) -> ScratchWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
