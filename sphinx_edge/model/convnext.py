"""CLIP-ConvNeXt trunk (open_clip `convnext_xxlarge` = timm ConvNeXt), inference only.

Parameter names match timm's ConvNeXt exactly, so the trunk of an open_clip / SPHINX checkpoint
loads with `load_state_dict` after stripping its prefix. Drop path, dropout and the classifier
(pooling + fc) are left out: the encoder is frozen and SPHINX reads the normed stage-4 map.

The four-expert llama_ens / llama_ens5 read their 224 px views as the reference's encode_image does
(accessory/model/LLM/llama_ens.py): a nearest resize to 256 px (`input_size`), the 8x8 map, each
token repeated 2x2 (`token_upsample`) to the 16x16 of the other experts, the mean taken after that.
The reference resizes in fp16 (`x.half()`); here the view keeps its dtype, which only rounds less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sphinx_edge.config import ConvNeXtConfig
from sphinx_edge.model.mlp import Mlp


def nearest_resize(x: Tensor, side: int) -> Tensor:
    """`F.interpolate(x, size=(side, side), mode="nearest")` as a gather of rows and columns: source
    index floor(i * H / side) in integers. The same pixels in PyTorch, and exact in an exported graph:
    onnxruntime's nearest Resize divides by the float scale side / H and lands one pixel short where
    the quotient is whole (28 -> 32 px: output 8 read source 6, not 7)."""
    rows = torch.arange(side, device=x.device) * x.shape[-2] // side
    cols = torch.arange(side, device=x.device) * x.shape[-1] // side
    return x.index_select(-2, rows).index_select(-1, cols)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's LayerNorm2d).

    Written as permute + F.layer_norm over the last axis: a plain LayerNorm op that ONNX and
    ExecuTorch lower directly, unlike a hand-rolled mean/var over dim 1.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)




class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> fc1 -> GELU -> fc2 -> layer scale, plus the residual."""

    def __init__(self, dim: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        # timm's ls_init_value; None once an export has multiplied it into fc2 (fold_layer_scales)
        self.gamma: nn.Parameter | None = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # channels-last: norm and MLP act on the last axis
        y = self.mlp(self.norm(y))
        if self.gamma is not None:
            y = y * self.gamma  # layer scale is per channel, so apply it here too
        return x + y.permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, in_dim: int | None, dim: int, depth: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        # Stage 0 (in_dim is None) keeps the stem's stride 4 and width: timm gives it no
        # downsample, hence no `stages.0.downsample.*` params.
        if in_dim is None:
            self.downsample: nn.Module = nn.Identity()
        else:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, dim, 2, stride=2))
        self.blocks = nn.Sequential(*[Block(dim, mlp_ratio, eps) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    def __init__(self, config: ConvNeXtConfig) -> None:
        super().__init__()
        self.config = config
        dims, eps = config.dims, config.norm_eps
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=eps))
        in_dims = (None, *dims[:-1])
        self.stages = nn.Sequential(
            *[Stage(a, b, n, config.mlp_ratio, eps) for a, b, n in zip(in_dims, dims, config.depths)]
        )
        # timm's NormMlpClassifierHead keeps only its `norm` here: pooling and fc are not used.
        self.head = nn.ModuleDict({"norm": LayerNorm2d(dims[-1], eps=eps)})

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, 1 + (H/32)*(W/32), dims[-1]]: mean token, then row-major tokens
        (with `input_size` S and `token_upsample` u: [N, 1 + (S/32*u)**2, dims[-1]])."""
        side, u = self.config.input_size, self.config.token_upsample
        if side:
            x = nearest_resize(x, side)
        x = self.head["norm"](self.stages(self.stem(x)))
        if u > 1:
            x = x.repeat_interleave(u, dim=-1).repeat_interleave(u, dim=-2)
        x = x.flatten(2).transpose(1, 2)  # [N, C, h, w] -> [N, h*w, C], index y*w + x
        # SPHINX prepends the mean of the normed tokens (not a re-normed pooled vector).
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
