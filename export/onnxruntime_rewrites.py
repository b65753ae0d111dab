"""Rewrites that let onnxruntime's CPU run the vision encoder faster, applied before the ONNX export.

ConvNeXt's MLPs (fc1 -> GELU -> fc2 over every position of a channels-last map) make the largest
activations of a view: SPHINX-Tiny's first stage widens 128 x 128 positions to 1,536 channels, 100 MB
in fp32, which fc1 writes, GELU reads and writes, and fc2's dynamic quantization reads twice. Each of
those passes runs at memory speed, not at the int8 GEMM's: the first stage's matmuls ran at 360-420
GMAC/s against 1,100-1,300 in the third (benchmarks/RESULTS.md, "ConvNeXt's MLPs a few rows at a
time"). `RowChunkedMlp` runs the same MLP over a few rows of the map at a time (about
`CHUNK_POSITIONS` positions), so that one chunk's activations (3-6 MB) stay in the cores' caches
between the three ops. Smaller chunks cost more than they save: the third stage's MLPs in chunks of
128 positions ran slower than whole, so maps under `WHOLE_BYTES` run whole.

The positions are independent, so in fp32 the chunks give the same numbers as the whole map; in the
int8 graph each chunk gets its own activation scale (dynamic quantization), a finer one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sphinx_edge.model.convnext import Block
from sphinx_edge.model.mlp import Mlp

CHUNK_POSITIONS = 512  # rows of the int8 GEMM per chunk: fewer ran it below its speed
WHOLE_BYTES = 32 << 20  # a view's hidden activations (fp32) up to this run whole: SPHINX-Tiny's last two stages


class RowChunkedMlp(nn.Module):
    """`mlp` over a channels-last map [N, H, W, C], whole rows of about `chunk_positions` positions at
    a time, where one view's hidden activations exceed `whole_bytes`. The sizes are read from the
    input's shape, which is fixed per stage in an exported graph (only N varies)."""

    def __init__(self, mlp: Mlp, chunk_positions: int = CHUNK_POSITIONS, whole_bytes: int = WHOLE_BYTES) -> None:
        super().__init__()
        self.mlp, self.chunk_positions, self.whole_bytes = mlp, chunk_positions, whole_bytes

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1], x.shape[2]
        rows = max(1, self.chunk_positions // width)
        if height * width * self.mlp.fc1.out_features * 4 <= self.whole_bytes or rows >= height:
            return self.mlp(x)
        # Mlp.forward spelled out with each weight transposed once: calling the Linear per chunk
        # would give the exported graph a transposed copy of its weight per chunk.
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        w1, w2 = fc1.weight.t(), fc2.weight.t()
        return torch.cat([F.gelu(part @ w1 + fc1.bias) @ w2 + fc2.bias for part in x.split(rows, dim=1)], dim=1)


def chunk_convnext_mlps(convnext: nn.Module, chunk_positions: int = CHUNK_POSITIONS,
                        whole_bytes: int = WHOLE_BYTES) -> int:
    """Wraps (in place) the MLP of every ConvNeXt block in `convnext` in a `RowChunkedMlp`; returns how
    many. Blocks already wrapped are left as they are."""
    count = 0
    for block in convnext.modules():
        if isinstance(block, Block) and isinstance(block.mlp, Mlp):
            block.mlp = RowChunkedMlp(block.mlp, chunk_positions, whole_bytes)
            count += 1
    return count
