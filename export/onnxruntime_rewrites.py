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

ConvNeXt's downsampling convolutions (2 x 2, stride 2, between stages) are dense GEMMs in disguise
(4.8 GMAC a view each in SPHINX-Tiny), but onnxruntime runs a Conv in fp32, and only MatMuls get int8
weights: the three took 90 ms of a 1.5 s view. `PatchMatMulDownsample` computes the same LayerNorm and
convolution as one MatMul over each 2 x 2 patch of the channels-last map, which the int8 export
quantizes like every other linear layer; it also drops the layout reorders around the Conv.

Layer scales (a per-channel gain at the end of each residual branch: ConvNeXt's `gamma`, DINOv2's
`ls1` / `ls2`) are a multiply over a whole activation map, 120 of them in a SPHINX-Tiny view.
`fold_layer_scales` multiplies each into the output rows of the linear layer before it: the same
function, and in the int8 graph the same int8 weights (a per-column scale absorbs the gain).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sphinx_edge.model.convnext import Block, LayerNorm2d
from sphinx_edge.model.dinov2 import Block as DINOv2Block
from sphinx_edge.model.dinov2 import LayerScale, SwiGLUFFNFused
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


class PatchMatMulDownsample(nn.Module):
    """A ConvNeXt stage's downsampling, LayerNorm over channels then a k x k convolution of stride k
    (no padding), as LayerNorm and one matmul over the k x k patches of the channels-last map. NCHW in
    and out, as the stage's blocks take it. The weight is kept as [k * k * C_in, C_out] with rows in
    (row, column, channel) order, the order the patches are flattened in."""

    def __init__(self, norm: LayerNorm2d, conv: nn.Conv2d) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        if (conv.kernel_size != (k, k) or conv.stride != (k, k) or conv.padding != (0, 0)
                or conv.dilation != (1, 1) or conv.groups != 1):
            raise ValueError(f"not a patch convolution (k x k, stride k, no padding): {conv}")
        self.norm, self.k = norm, k
        weight = conv.weight.detach().permute(2, 3, 1, 0).reshape(k * k * conv.in_channels, conv.out_channels)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = conv.bias

    def forward(self, x: Tensor) -> Tensor:
        k, (channels, height, width) = self.k, x.shape[1:]
        rows, cols = height // k, width // k
        if (rows * k, cols * k) != (height, width):  # a stride-k convolution drops a ragged edge
            x = x[:, :, :rows * k, :cols * k]
        # One 4-D transpose moves the channels last; the patch shuffle after it moves whole pixels.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        x = x.reshape(-1, rows, k, cols, k, channels).transpose(2, 3).reshape(-1, rows, cols, k * k * channels)
        y = x @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.permute(0, 3, 1, 2)


def matmul_convnext_downsamples(convnext: nn.Module) -> int:
    """Replaces (in place) every stage's downsampling in `convnext` by a `PatchMatMulDownsample`;
    returns how many. Stages already replaced, or without one (the first), are left as they are."""
    count = 0
    for stage in getattr(convnext, "stages", ()):
        down = stage.downsample
        if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], LayerNorm2d):
            stage.downsample = PatchMatMulDownsample(down[0], down[1])
            count += 1
    return count


@torch.no_grad()
def _scale_outputs(linear: nn.Linear, gain: Tensor) -> None:
    linear.weight.mul_(gain[:, None])
    if linear.bias is not None:
        linear.bias.mul_(gain)


def _branch_end(mlp: nn.Module) -> nn.Linear:
    """The linear layer that ends an MLP branch (ours, chunked or DINOv2's SwiGLU)."""
    mlp = mlp.mlp if isinstance(mlp, RowChunkedMlp) else mlp
    return mlp.w3 if isinstance(mlp, SwiGLUFFNFused) else mlp.fc2


def fold_layer_scales(model: nn.Module, after_each: Callable[[], None] | None = None) -> int:
    """Multiplies (in place) every layer scale in `model`, ConvNeXt's and DINOv2's, into the linear
    layer that ends its branch, and drops it; returns how many. Already folded ones are left as they are.
    `after_each` runs after each weight is changed: weights in a scratch file hand their pages back
    there (`ScratchWeights.written`), or folding SPHINX-Tiny would make 2.7 GB of them resident."""

    def fold(linear: nn.Linear, gain: Tensor) -> None:
        _scale_outputs(linear, gain)
        if after_each:
            after_each()

    count = 0
    for block in model.modules():
        if isinstance(block, Block) and block.gamma is not None:
            fold(_branch_end(block.mlp), block.gamma)
            block.gamma = None
            count += 1
        elif isinstance(block, DINOv2Block):
            for name, end in (("ls1", block.attn.proj), ("ls2", _branch_end(block.mlp))):
                scale = getattr(block, name)
                if isinstance(scale, LayerScale):
                    fold(end, scale.gamma)
                    setattr(block, name, nn.Identity())
                    count += 1
    return count
