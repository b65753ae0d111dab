"""OpenAI CLIP ViT (open_clip `VisionTransformer`), read as SPHINX reads it; inference only.

Parameter names match open_clip's visual tower exactly, so LLaMA2-Accessory's `llma.clip.visual.*`
tensors load with `load_state_dict` after stripping that prefix. The forward is the reference's
`clip_encode_image` (accessory/model/LLM/llama_ens.py): every token is kept (CLS + patches) and
`ln_post` is applied to all of them; `proj` is loaded but not applied (it is commented out there),
so the output has the trunk width (1024 for ViT-L/14), not the 768 of CLIP's joint space.

The activation is a setting. OpenAI trained CLIP with QuickGELU, and open_clip 2.x builds that only
on its `pretrained='openai'` path; LLaMA2-Accessory builds `ViT-L-14` with `pretrained=None` (exact
GELU) whenever `load_pretrained_visual_encoder` is off, i.e. when it loads a released checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sphinx_edge.config import CLIPViTConfig
from sphinx_edge.model.attention import fused_qkv_attention


class Attention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight / in_proj_bias, out_proj), batch first."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # nn.MultiheadAttention's fused layout
        return self.out_proj(fused_qkv_attention(qkv, self.n_heads))  # no mask in the vision tower


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)
        self.quick_gelu = quick_gelu

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_fc(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)
        return self.c_proj(x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: CLIPViTConfig) -> None:
        super().__init__()
        dim, eps = config.width, config.norm_eps
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, config.mlp_hidden, config.quick_gelu)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """open_clip's `Transformer`: only its `resblocks`, run batch first (the reference runs them
    sequence first, LND, which is the same computation per view)."""

    def __init__(self, config: CLIPViTConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(config) for _ in range(config.layers)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPViT(nn.Module):
    def __init__(self, config: CLIPViTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.width, config.patch_size
        scale = d**-0.5  # open_clip's init, so an unloaded model is still well scaled
        self.conv1 = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + config.n_patches, d))
        self.ln_pre = nn.LayerNorm(d, eps=config.norm_eps)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(d, eps=config.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(d, config.output_dim))  # loaded, not applied

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, S, S] CLIP-normalised, S = image_size -> [N, 1 + (S/p)**2, width]: CLS, then
        row-major patch tokens, all after ln_post (257 x 1024 for ViT-L/14 at 224 px)."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, h*w, D], row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        # Added as is: the reference has no resize, so a view must be image_size square.
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)
