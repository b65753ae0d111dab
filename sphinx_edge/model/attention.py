"""Unmasked multi-head attention over a fused [q; k; v] projection, as the ViT encoders store it
(DINOv2's `qkv`, EVA's `qkv`, open_clip's `in_proj_weight`): rows [q; k; v], each split into heads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def fused_qkv_attention(qkv: Tensor, n_heads: int) -> Tensor:
    """[N, T, 3D] -> [N, T, D]; scale head_dim ** -0.5. Written as view + permute (not chunk), which
    exports without split copies."""
    n, t, d3 = qkv.shape
    q, k, v = qkv.view(n, t, 3, n_heads, d3 // (3 * n_heads)).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).reshape(n, t, d3 // 3)
