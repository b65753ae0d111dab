"""Tensor-layout conversions between checkpoint kinds (pure functions on weight tensors)."""

from __future__ import annotations

import torch

from sphinx_edge.config import LLMConfig


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows of the Meta / LLaMA2-Accessory interleaved RoPE -> the rotate-half (HF) form."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v], dim=0)


def split_qkv(wqkv: torch.Tensor, cfg: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hd = cfg.head_dim
    q, k, v = wqkv.split([cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd], dim=0)
    return q, k, v


def internlm2_wqkv_to_fused(w: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """InternLM2 groups rows per kv head as [q_0 .. q_{g-1}, k, v]; ours is [all q; all k; all v]."""
    groups = cfg.n_heads // cfg.n_kv_heads
    w = w.view(cfg.n_kv_heads, groups + 2, cfg.head_dim, cfg.dim)
    return fuse_qkv(w[:, :groups].reshape(-1, cfg.dim), w[:, -2].reshape(-1, cfg.dim), w[:, -1].reshape(-1, cfg.dim))


def fused_to_internlm2_wqkv(wqkv: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    groups = cfg.n_heads // cfg.n_kv_heads
    q, k, v = (t.view(cfg.n_kv_heads, -1, cfg.head_dim, cfg.dim) for t in split_qkv(wqkv, cfg))
    return torch.cat([q.view(cfg.n_kv_heads, groups, cfg.head_dim, cfg.dim), k, v], dim=1).reshape(-1, cfg.dim)
