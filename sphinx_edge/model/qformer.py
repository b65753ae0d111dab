"""BLIP-2's EVA ViT-g + Q-Former + query tokens (transformers' `Blip2Model` minus the LLM), inference only.

Parameter names match transformers' `Blip2Model` (`vision_model.*`, `query_tokens`, `qformer.*`),
so LLaMA2-Accessory's `llma.qformer.*` tensors load with `load_state_dict` after stripping that
prefix (its `language_projection` / `language_model` are set to None, so none are stored). The
Q-Former here only runs the 32 query tokens: it has no text input, hence no text feed-forward
(`intermediate` / `output`, which the transformers versions SPHINX was built with do not create).
The forward is `Blip2Model.get_qformer_features(pixel_values).last_hidden_state`, what the
reference feeds to `qformer_proj`. Dropout is left out; all attention is unmasked (the reference
passes an all-ones image mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sphinx_edge.config import QFormerConfig
from sphinx_edge.model.attention import fused_qkv_attention
from sphinx_edge.model.mlp import Mlp


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """[N, T, D] -> [N, H, T, D/H]: heads are contiguous slices of D."""
    n, t, d = x.shape
    return x.view(n, t, n_heads, d // n_heads).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """[N, Tq, D], [N, Tk, D] x2 -> [N, Tq, D]."""
    x = F.scaled_dot_product_attention(_heads(q, n_heads), _heads(k, n_heads), _heads(v, n_heads))
    return x.transpose(1, 2).flatten(2)  # scale was head_dim ** -0.5, as transformers


# --- EVA ViT-g (`vision_model`) -------------------------------------------------------------------


class VisionEmbeddings(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        d, p = config.vision_dim, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + config.n_patches, d))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, h*w, D], row-major
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding.to(x.dtype)  # no resize: views are image_size square


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        # One fused bias [q; k; v]: EVA has q and v biases only, so the k third is zero in the
        # released weights; it is kept as loaded rather than assumed.
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(fused_qkv_attention(self.qkv(x), self.n_heads))


class VisionLayer(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        d, eps = config.vision_dim, config.vision_norm_eps
        self.self_attn = VisionAttention(d, config.vision_heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.mlp = Mlp(d, config.vision_mlp)  # fc1 -> exact GELU -> fc2, as Blip2MLP ("gelu")
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(config) for _ in range(config.vision_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.vision_dim, eps=config.vision_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, S, S] -> [N, 1 + (S/p)**2, vision_dim]: Blip2VisionModel's last_hidden_state,
        which is post-layernormed (the Q-Former cross-attends to it)."""
        return self.post_layernorm(self.encoder(self.embeddings(x)))


# --- Q-Former (`qformer`) -------------------------------------------------------------------------


class DenseNorm(nn.Module):
    """BERT's output block: LayerNorm(dense(h) + residual) (Blip2QFormerSelfOutput / Blip2QFormerOutput)."""

    def __init__(self, in_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # transformers' (BERT's) name

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class QKV(nn.Module):
    def __init__(self, dim: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)


class QFormerAttention(nn.Module):
    """Post-norm attention: self-attention (kv_dim = dim) or cross-attention to the image tokens."""

    def __init__(self, dim: int, kv_dim: int, n_heads: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attention = QKV(dim, kv_dim)
        self.output = DenseNorm(dim, dim, eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        a = self.attention
        h = _attend(a.query(x), a.key(context), a.value(context), self.n_heads)
        return self.output(h, x)


class Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact GELU ("gelu")


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, cross: bool) -> None:
        super().__init__()
        q, eps, heads = config.qformer_dim, config.qformer_norm_eps, config.qformer_heads
        self.attention = QFormerAttention(q, q, heads, eps)
        # A layer either has cross-attention or lacks the module (and its weights) altogether.
        self.crossattention = QFormerAttention(q, config.vision_dim, heads, eps) if cross else None
        self.intermediate_query = Intermediate(q, config.qformer_mlp)
        self.output_query = DenseNorm(config.qformer_mlp, q, eps)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        x = self.attention(x, x)
        if self.crossattention is not None:  # fixed per layer at build time, not data-dependent
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        every = config.cross_attention_every
        layers = [QFormerLayer(config, cross=i % every == 0) for i in range(config.qformer_layers)]
        self.layer = nn.ModuleList(layers)


class QFormerModel(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(config.qformer_dim, eps=config.qformer_norm_eps)
        self.encoder = QFormerEncoder(config)

    def forward(self, queries: Tensor, image: Tensor) -> Tensor:
        x = self.layernorm(queries)  # the queries are normed once on entry (BERT's embedding norm)
        for layer in self.encoder.layer:
            x = layer(x, image)
        return x


class QFormer(nn.Module):
    """The SPHINX expert `qformer`: a view's 32 query tokens after the Q-Former."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.n_queries, config.qformer_dim))
        self.qformer = QFormerModel(config)

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, S, S] CLIP-normalised, S = image_size -> [N, n_queries, qformer_dim] (32 x 768)."""
        image = self.vision_model(x)
        queries = self.query_tokens.to(image.dtype).expand(x.shape[0], -1, -1)
        return self.qformer(queries, image)
