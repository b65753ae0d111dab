"""The LLM backbone: a LLaMA-style decoder covering the llama, internlm2 and mixtral families.

Pre-RMSNorm, rotary embeddings, SwiGLU (or a sparse top-k mixture of SwiGLU experts), GQA, no
biases, untied output head. Module names follow LLaMA2-Accessory (`tok_embeddings`, `layers.N.
attention`, `feed_forward`, `attention_norm`, `ffn_norm`, `norm`, `output`) except that q, k and v
are one fused `wqkv` projection for every family (one GEMM; the checkpoint readers convert).

RoPE is the rotate-half form of Hugging Face checkpoints; LLaMA2-Accessory's interleaved (complex)
form is converted on load by permuting the q/k rows (`checkpoints.convert.permute_rope_rows`).
The forward is torch.export-friendly: no data-dependent Python control flow, a static KV cache
written with `index_copy_`, and RoPE angles computed from the position tensor (no buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sphinx_edge.config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as every reference implementation does; cast back before the scale.
        # Divided by the root rather than times its reciprocal: onnxruntime fuses this form (Pow,
        # ReduceMean, Add, Sqrt, Div) into one SimplifiedLayerNormalization kernel.
        x32 = x.float()
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for the rotate-half form, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates the two halves of each head (Hugging Face's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """A preallocated cache [B, kv_heads, max_seq_len, head_dim], written at `input_pos`."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """[T, cached length] bool: query at position p sees every cache slot up to p."""
        return torch.arange(self.k_cache.shape[2], device=input_pos.device)[None, :] <= input_pos[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rotates q [B, heads, T, hd] and k [B, kv_heads, T, hd] (RoPE), writes k, v at
        `input_pos`, then attends q over the cache; returns [B, T, heads * hd]. Every cache (the
        export graphs' too) has this method: how a cache is written decides how it is best read,
        and a fused kernel may rotate as it goes (onnxruntime's GroupQueryAttention)."""
        k, v = self.update(input_pos, apply_rope(k, cos, sin), v)
        return cached_attention(apply_rope(q, cos, sin), k, v, mask)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, hd] over a cache k, v [B, H_kv, S, hd] under `mask` [T, S]; [B, T, H * hd]."""
    B, H, T, hd = q.shape
    if k.shape[1] != H:
        return _grouped_attention(q, k, v, mask)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, H * hd)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GQA against the cache without expanding it: the g query heads that share a KV head form
    one dimension of the einsums, and the cache is read once per KV head. Expanding the cache to
    every query head (repeat_interleave, or a broadcasting matmul, which lowers to expand_copy)
    copied a 4096-slot cache 8x per layer and token, outside XNNPACK: a 2-layer decoder of
    TinyLlama's shape took 180 ms per token in ExecuTorch, 24 ms with this (benchmarks/RESULTS.md).
    SDPA would need the g x T query rows merged, a view torch.export cannot prove for a dynamic T."""
    B, H, T, hd = q.shape
    n_kv_heads = k.shape[1]
    q = q.view(B, n_kv_heads, H // n_kv_heads, T, hd)
    scores = torch.einsum("bkgtd,bksd->bkgts", q, k) * hd**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    y = torch.einsum("bkgts,bksd->bkgtd", probs, v).reshape(B, H, T, hd)
    return y.transpose(1, 2).reshape(B, T, H * hd)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        if self.kv_cache is not None:
            return self.wo(self.kv_cache.attend(q, k, v, cos, sin, input_pos, mask))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # explicit GQA expansion: exports everywhere
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse mixture: a linear router picks the top-k of n SwiGLU experts per token.

    Expert weights are stacked ([E, hidden, dim] for w1/w3, [E, dim, hidden] for w2). In eager
    mode each expert runs on its routed tokens only; under torch.export every expert runs on every
    token and unrouted results are weighted by zero (same numbers, static shapes).
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # Mixtral: softmax over all experts, keep the top k, renormalise (done in fp32).
        probs = self.gate(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        dense = torch.zeros_like(probs, dtype=x.dtype).scatter(1, experts, weights)  # [N, E]
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            if torch.compiler.is_exporting():
                out = out + dense[:, e : e + 1] * self._expert(e, x)
            else:
                rows = (experts == e).any(dim=-1).nonzero().squeeze(-1)
                if rows.numel():
                    out.index_add_(0, rows, dense[rows, e : e + 1] * self._expert(e, x[rows]))
        return out.reshape(shape)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        if cfg.n_experts:
            self.feed_forward: nn.Module = MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.n_experts_per_tok)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, input_pos, mask):  # noqa: ANN001, ANN201 (hot path, see Transformer)
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def setup_caches(self, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Attach a fresh static KV cache to every layer (on the weights' device)."""
        cfg = self.config
        device = self.output.weight.device
        dtype = dtype or self.output.weight.dtype
        for layer in self.layers:
            cache = KVCache(batch, cfg.n_kv_heads, max_seq_len or cfg.max_seq_len, cfg.head_dim, dtype)
            layer.attention.kv_cache = cache.to(device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def hidden(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] for `inputs_embeds` [B, T, dim].

        With caches set up, `input_pos` [T] holds the positions being written and the cache decides
        which keys each query sees (`attention_mask`: every cached position up to its own). Without
        caches, the sequence starts at position 0 (or at `input_pos`) and attention is plainly
        causal (training).
        """
        T = inputs_embeds.shape[1]
        if input_pos is None:
            input_pos = torch.arange(T, device=inputs_embeds.device)
        cache = self.layers[0].attention.kv_cache
        mask = None if cache is None else cache.attention_mask(input_pos)
        cos, sin = rope_cos_sin(input_pos, self.config.head_dim, self.config.rope_theta)
        h = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, input_pos, mask)
        return self.norm(h)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab], or [B, 1, vocab] for the last position only (prefill)."""
        h = self.hidden(inputs_embeds, input_pos)
        return self.output(h[:, -1:] if last_logits_only else h)
