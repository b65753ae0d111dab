"""Rewrites that let XNNPACK run the whole vision encoder of a .pte, applied before `torch.export`.

Profiled on SPHINX-Tiny's one-view vision method (ExecuTorch's ETDump, 2 threads; benchmarks/RESULTS.md,
"Faster vision"): a view took 6.3 s against onnxruntime's 4.2 s, though XNNPACK's int8 GEMMs were faster
than onnxruntime's. The rest went to three things, each fixed here without changing the numbers:

* ConvNeXt's 7x7 depthwise convolutions (1.6 s): XNNPACK's depthwise kernels stop at 25 taps, and a
  49-tap one falls back to its grouped GEMM path, 5x slower. `RingDepthwiseConv` computes the same
  convolution as a centre 5x5 plus the outer ring as two dilated convolutions (7x2 and 2x5 taps),
  each a depthwise kernel XNNPACK has.
* DINOv2's attention: `scaled_dot_product_attention` decomposes into a "safe softmax" (where, any, eq,
  logical_not) that XNNPACK does not take, so every block left the delegate (0.5 s). `ATTENTION_AS_MATMULS`
  decomposes it into batched matmuls and a softmax instead.
* DINOv2's position embeddings were resized (bicubic, index and clamp ops) on every call (0.3 s): a
  view has a fixed size, so the resized table is kept as a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

XNNPACK_MAX_DEPTHWISE_TAPS = 25  # its largest unipass depthwise kernel (5x5)


class RingDepthwiseConv(nn.Module):
    """A depthwise k x k convolution (stride 1, "same" padding, odd k) as the sum of a centre
    (k-2) x (k-2) one and its outer ring: the two outer columns as one k x 2 kernel dilated by k-1,
    the two outer rows (corners excluded) as one 2 x (k-2) kernel dilated by k-1. Symmetric padding
    keeps every output aligned, so no slicing is needed."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        w = conv.weight.detach()
        self.groups, self.k = conv.groups, k
        centre = nn.Conv2d(conv.in_channels, conv.out_channels, k - 2, padding=k // 2 - 1, groups=conv.groups,
                           bias=conv.bias is not None)
        centre.weight = nn.Parameter(w[:, :, 1:-1, 1:-1].clone(), requires_grad=False)
        if conv.bias is not None:
            centre.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.centre = split_depthwise(centre)
        self.columns = nn.Parameter(w[:, :, :, [0, k - 1]].clone(), requires_grad=False)
        self.rows = nn.Parameter(w[:, :, [0, k - 1], 1:-1].clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        k, r = self.k, self.k // 2
        y = self.centre(x)
        y = y + F.conv2d(x, self.columns, padding=(r, r), dilation=(1, k - 1), groups=self.groups)
        return y + F.conv2d(x, self.rows, padding=(r, r - 1), dilation=(k - 1, 1), groups=self.groups)


def _needs_split(conv: nn.Conv2d) -> bool:
    k = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1] and k[0] % 2 == 1
            and k[0] * k[1] > XNNPACK_MAX_DEPTHWISE_TAPS and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding == (k[0] // 2, k[0] // 2) and conv.padding_mode == "zeros")


def split_depthwise(conv: nn.Conv2d) -> nn.Module:
    """`conv` as XNNPACK's depthwise kernels can run it: unchanged when it fits one, else a ring sum."""
    return RingDepthwiseConv(conv) if _needs_split(conv) else conv


def split_depthwise_convs(module: nn.Module) -> int:
    """Replaces (in place) every depthwise convolution in `module` too large for one XNNPACK kernel;
    returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and _needs_split(child):
                setattr(parent, name, RingDepthwiseConv(child))
                count += 1
    return count


def _attention_as_matmuls(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                          enable_gqa: bool = False) -> Tensor:
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("only unmasked, non-causal attention is decomposed for XNNPACK")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    # 3-D batched matmuls: a 4-D `@` exports with broadcasting copies (expand) that XNNPACK leaves out.
    *batch, t, d = query.shape
    q, k, v = (x.reshape(-1, x.shape[-2], x.shape[-1]) for x in (query, key, value))
    weights = torch.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
    return torch.bmm(weights, v).reshape(*batch, t, v.shape[-1])


# For `ExportedProgram.run_decompositions`: only this op is decomposed, the rest stays as it is.
ATTENTION_AS_MATMULS = {torch.ops.aten.scaled_dot_product_attention.default: _attention_as_matmuls}


def prepare_vision_for_xnnpack(model: nn.Module) -> None:
    """The SPHINX model's vision experts (in place) as XNNPACK runs them whole: large depthwise
    convolutions split, DINOv2's position embeddings fixed for its view size. Attention is handled at
    export (`ATTENTION_AS_MATMULS`)."""
    split_depthwise_convs(model.convnext)
    size = model.config.dinov2.image_size
    model.dinov2.fix_input_size(size, size)
