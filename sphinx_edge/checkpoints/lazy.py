"""A checkpoint's tensors, in our names, each read from its files only when asked for.

The readers open the weight files memory-mapped and describe every tensor (its shape and dtype, as a
meta tensor) without reading it; `LazyTensors[name]` reads one (merging tensor-parallel shards, renaming,
permuting as the format needs). So a model is built one parameter at a time (`model.sphinx.materialize`
with a `LazyTensors` as the fill) and an export stage that wants only the vision experts never reads
the LLM: no stage holds a second copy of the weights it loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from sphinx_edge.checkpoints.strict import CheckpointError
from sphinx_edge.processes import drop_mapped_pages, file_mappings


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
        self._mappings: list[tuple[int, int]] | None = None  # the files' mappings, found at the first fill

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
        if self._mappings is None:  # mapped when the files were opened: they stay where they are
            self._mappings = file_mappings(self.files)
        drop_mapped_pages(self._mappings)

    def skip(self, name: str, shape: torch.Size) -> None:
        pass

