"""DINOv2 ViT (torch-hub layout, no registers), inference only.

Parameter names match the hub checkpoints (`dinov2_vitg14` etc.) exactly. Drop path, dropout and
masking are left out (`mask_token` is kept only so hub state dicts load strictly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sphinx_edge.config import DINOv2Config
from sphinx_edge.model.attention import fused_qkv_attention
from sphinx_edge.model.mlp import Mlp


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, h*w, D], row-major


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(fused_qkv_attention(self.qkv(x), self.n_heads))  # the hub's layout and scale


class SwiGLUFFNFused(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)




class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # hub backbones are built with init_values=1.0

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, config: DINOv2Config) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.n_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        ffn = SwiGLUFFNFused if config.ffn == "swiglu" else Mlp
        self.mlp = ffn(dim, config.ffn_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    def __init__(self, config: DINOv2Config) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused: only masked pre-training reads it
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.fixed_pos: Tensor | None = None  # see fix_input_size

    def fix_input_size(self, height: int, width: int) -> None:
        """Keeps the position embeddings for one input size as a constant (not a parameter), so an
        exported graph reads them instead of resizing the table on every call. Export only: later
        changes to `pos_embed` are not seen for that size."""
        self.fixed_pos = self.interpolate_pos_encoding(height, width).detach().clone()

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """Position embeddings [1, 1 + h0*w0, D] (float32 when resized) for a height x width input.

        DINOv2's own rule (hub `interpolate_pos_encoding`): bicubic with a scale factor of
        (h0 + 0.1) / M per axis, not `size=(h0, w0)`. The scale factor enters PyTorch's source
        coordinate mapping, so the two give visibly different embeddings; the released models
        were run with this one. Everything here depends on static shapes only, so it exports
        (and can be constant-folded, since each view has a fixed size).
        """
        p, m = self.config.patch_size, self.config.pos_grid
        h0, w0 = height // p, width // p
        # Hub condition: same patch count and a square input pixel-wise.
        if h0 * w0 == m * m and height == width:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).contiguous()  # Core ML takes contiguous tensors only
        # The hub unpacks `B, nc, w, h = x.shape`, so its "w0"/"sx" is really the height axis and
        # its scale_factor=(sx, sy) is in (H, W) order, as written here.
        offset = self.config.interpolate_offset
        scale = ((h0 + offset) / m, (w0 + offset) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        assert grid.shape[-2:] == (h0, w0), f"pos-embed resize gave {tuple(grid.shape[-2:])}, want {(h0, w0)}"
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, 1 + (H/p)*(W/p), D]: normed CLS token, then row-major patch tokens."""
        height, width = x.shape[-2:]
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.fixed_pos
        if pos is None or pos.shape[1] != x.shape[1]:
            pos = self.interpolate_pos_encoding(height, width)
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # = cat([x_norm_clstoken, x_norm_patchtokens]) of forward_features
