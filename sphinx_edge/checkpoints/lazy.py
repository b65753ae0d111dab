"""A checkpoint's tensors, in our names, each read from its files only when asked for.

The readers open the weight files memory-mapped and describe every tensor (its shape and dtype, as a
meta tensor) without reading it; `LazyTensors[name]` reads one (merging tensor-parallel shards, renaming,
permuting as the format needs). So a model is built one parameter at a time (`model.sphinx.materialize`
with a `LazyTensors` as the fill) and an export stage that wants only the vision experts never reads
the LLM: no stage holds a second copy of the weights it loads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from sphinx_edge.checkpoints.strict import CheckpointError


class LazyTensors(Mapping[str, torch.Tensor]):
    """`read[name]()` returns the tensor `name`, `meta[name]` its shape and dtype (on the meta device).

    It is also a fill for `model.sphinx.materialize`: `tensors(name, p)` copies the tensor into the
    parameter `p` (converting its dtype), then hands the pages of the memory-mapped `files` it read
    back to the kernel; `skip` has nothing to do, as nothing is read ahead. A page read from a mapped
    file counts in the process's RSS until the file is unmapped: SPHINX-Tiny's vision experts took
    their 2.3 GB of bf16 pages on top of their fp32 copy."""

    def __init__(self, read: dict[str, Callable[[], torch.Tensor]], meta: dict[str, torch.Tensor],
                 source: str, files: Sequence[Path] = ()) -> None:
        self.read, self.meta, self.source = read, meta, source
        self.files = [Path(f).resolve() for f in files]

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.read[name]()
        except KeyError:
            raise
        except Exception as e:  # a file truncated or changed after it was opened
            raise CheckpointError(f"cannot read {name} from {self.source}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.read)

    def __len__(self) -> int:
        return len(self.read)

    @torch.no_grad()
    def __call__(self, name: str, p: torch.Tensor) -> None:
        p.copy_(self[name])
        drop_file_pages(self.files)

    def skip(self, name: str, shape: torch.Size) -> None:
        pass


MADV_DONTNEED = 4


def drop_file_pages(files: Sequence[Path]) -> None:
    """Hands back the pages this process has read of its (private, read-only) mappings of `files`: a
    later read faults them in from the file again. Only file-backed mappings are touched (the same
    advice on anonymous memory would zero it). Linux; elsewhere nothing happens."""
    if not files:
        return
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    wanted = {str(f) for f in files}
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in wanted:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
