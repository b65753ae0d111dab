"""The three exported components of a SPHINX model, as plain nn.Modules over its weights.

* `VisionEncoder`: packed views [N, 3, tile + dino, tile] (`layout.pack_views`) -> image
  embeddings [N, tokens_per_view, dim], start_img / end_img included. N is dynamic; a runtime
  passes the encoded views only, so fully padded tiles cost nothing.
* `TokenEmbedding`: ids [1, L] -> [1, L, dim] over the text vocabulary plus the three image
  specials (skip, start_img, end_img at ids vocab, vocab + 1, vocab + 2), so any runner can place
  a skip tile as a plain token (docs/ARCHITECTURE.md, section 4).
* `TextDecoder` (ExecuTorch): embeddings [1, L, dim] + positions [L] -> last-token logits
  [1, 1, vocab], with the static KV cache inside as mutable buffers (`LlamaOpsKVCache`:
  written in place and read up to the current position by ExecuTorch's LLM custom ops).
* `PastKVDecoder` (ONNX): the optimum / transformers.js contract: `inputs_embeds`,
  `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` in, `logits` and
  `present.{i}.key|value` out; the cache travels as graph inputs and outputs, and attention is
  onnxruntime's fused `GroupQueryAttention` (so `attention_mask` must be all ones: batch 1).

The decoders reuse the model's own layers; only the cache object differs.
"""

from __future__ import annotations

import torch
from torch import nn

from sphinx_edge.model.llm import apply_rope, cached_attention, rope_cos_sin
from sphinx_edge.model.sphinx import SphinxModel


class VisionEncoder(nn.Module):
    def __init__(self, model: SphinxModel) -> None:
        super().__init__()
        self.model = model
        self.tile, self.dino = model.config.convnext.image_size, model.config.dinov2.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        convnext_views = pixel_values[:, :, : self.tile]
        dinov2_views = pixel_values[:, :, self.tile :, : self.dino]
        return self.model.encode_views(convnext_views, dinov2_views)


class TokenEmbedding(nn.Module):
    def __init__(self, model: SphinxModel) -> None:
        super().__init__()
        specials = [model.skip if model.skip is not None else torch.zeros_like(model.start_img),
                    model.start_img, model.end_img]
        table = torch.cat([model.llm.tok_embeddings.weight.detach(), *(s.detach()[0] for s in specials)])
        self.embedding = nn.Embedding.from_pretrained(table, freeze=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def load_llama_ops() -> None:
    """Registers ExecuTorch's LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`) with torch,
    for tracing and eager runs, and their kernels with ExecuTorch's runtime in this process."""
    from executorch.extension.pybindings import portable_lib  # noqa: F401 (must come first)
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class LlamaOpsKVCache(nn.Module):
    """A static cache [B, max_seq_len, kv_heads, head_dim] for ExecuTorch's LLM custom ops, as its
    own llama export uses them: `llama::update_cache` writes the new keys and values in place at
    the first position, and `llama::custom_sdpa` attends (GQA, causal) over the slots written so
    far only. With `index_copy_` into a buffer, ExecuTorch copied the whole cache on every write
    and attention read every slot: decode time grew with the context, not with the conversation
    (benchmarks/RESULTS.md). Positions must be consecutive (one sequence, as every runner has)."""

    def __init__(self, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        load_llama_ops()
        shape = (1, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def attention_mask(self, input_pos: torch.Tensor) -> None:
        return None  # custom_sdpa masks causally from the start position itself

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               input_pos: torch.Tensor, mask: None) -> torch.Tensor:
        B, H, T, hd = q.shape
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + T <= self.k_cache.shape[1])
        torch.ops.llama.update_cache(k.transpose(1, 2), self.k_cache, start)
        torch.ops.llama.update_cache(v.transpose(1, 2), self.v_cache, start)
        y = torch.ops.llama.custom_sdpa(q.transpose(1, 2), self.k_cache, self.v_cache, start, None, 0, True)
        return y.reshape(B, T, H * hd)


class TextDecoder(nn.Module):
    """The decoder with its static KV cache inside: `LlamaOpsKVCache` when `max_seq_len` is given
    (the exported program), else whatever caches the model has set up (`llm.setup_caches`)."""

    def __init__(self, model: SphinxModel, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.llm = model.llm
        if max_seq_len:
            c = self.llm.config
            for layer in self.llm.layers:
                layer.attention.kv_cache = LlamaOpsKVCache(c.n_kv_heads, max_seq_len, c.head_dim)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds, input_pos, last_logits_only=True)


@torch.library.custom_op("sphinx::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, attention_mask: torch.Tensor, cos_cache: torch.Tensor | None,
                          sin_cache: torch.Tensor | None, num_heads: int,
                          kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """onnxruntime's `com.microsoft.GroupQueryAttention` (no padding) in PyTorch: the ONNX export
    replaces this op by that one (`export/onnx.py`), which rotates (given the tables), appends to
    the cache and attends in one fused kernel. query [B, T, H * hd] and key, value [B, T, H_kv * hd];
    past [B, H_kv, P, hd]; attention_mask [B, P + T], all ones; cos_cache, sin_cache
    [max positions, hd / 2] (the rotate-half angles of positions 0, 1, ...), or None when q and k
    come rotated. Returns the attention output [B, T, H * hd] and the presents [B, H_kv, P + T, hd]."""
    B, T, _ = query.shape
    hd = past_key.shape[-1]
    P = past_key.shape[2]
    positions = torch.arange(P, P + T, device=query.device)
    q = query.view(B, T, num_heads, hd).transpose(1, 2)
    k = key.view(B, T, kv_num_heads, hd).transpose(1, 2)
    if cos_cache is not None:
        cos, sin = (torch.cat([c[positions], c[positions]], dim=-1) for c in (cos_cache, sin_cache))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    present_key = torch.cat([past_key, k], dim=2)
    present_value = torch.cat([past_value, value.view(B, T, kv_num_heads, hd).transpose(1, 2)], dim=2)
    mask = torch.arange(P + T, device=query.device)[None, :] <= positions[:, None]
    return cached_attention(q, present_key, present_value, mask), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache, num_heads, kv_num_heads):  # noqa: ANN001, ANN202
    B, T, _ = query.shape
    shape = (B, kv_num_heads, past_key.shape[2] + T, past_key.shape[3])
    return torch.empty_like(query), past_key.new_empty(shape), past_value.new_empty(shape)


class PastKV(nn.Module):
    """A KV cache whose past is a graph input and whose present (past + the new keys and values) a
    graph output, rotated and attended by one `group_query_attention` op (onnxruntime's fused
    kernel in the ONNX graph). Positions follow the past: batch 1, no padding. Duck-types
    `llm.KVCache`."""

    def __init__(self, rope_tables: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        super().__init__()
        self.rope_tables = rope_tables  # cos, sin [max positions, hd / 2] shared by every layer, or None
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None
        self.attention_mask_input: torch.Tensor | None = None  # the graph's attention_mask [1, past + T]

    def attention_mask(self, input_pos: torch.Tensor) -> None:
        return None  # the op masks causally from the past length itself

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               input_pos: torch.Tensor, mask: None) -> torch.Tensor:
        B, H, T, hd = q.shape
        if self.rope_tables is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        flat = lambda x: x.transpose(1, 2).reshape(B, T, -1)  # noqa: E731  [B, heads, T, hd] -> [B, T, heads * hd]
        y, *self.present = group_query_attention(flat(q), flat(k), flat(v), *self.past, self.attention_mask_input,
                                                 *(self.rope_tables or (None, None)), H, k.shape[1])
        return y


class PastKVDecoder(nn.Module):
    def __init__(self, model: SphinxModel) -> None:
        super().__init__()
        self.llm = model.llm
        c = self.llm.config
        rope_tables = None
        if c.head_dim % 16 == 0:  # onnxruntime's fused rotary takes no other head size (the test configs' 8)
            # The angles of every position of the context, as the model computes them (fp32).
            cos, sin = rope_cos_sin(torch.arange(c.max_seq_len), c.head_dim, c.rope_theta)
            self.register_buffer("rope_cos", cos[:, : c.head_dim // 2].contiguous(), persistent=False)
            self.register_buffer("rope_sin", sin[:, : c.head_dim // 2].contiguous(), persistent=False)
            rope_tables = (self.rope_cos, self.rope_sin)
        self.caches = [PastKV(rope_tables) for _ in self.llm.layers]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for i, (layer, cache) in enumerate(zip(self.llm.layers, self.caches)):
            cache.past = (past_key_values[2 * i], past_key_values[2 * i + 1])
            cache.attention_mask_input = attention_mask
            layer.attention.kv_cache = cache
        try:
            logits = self.llm(inputs_embeds, position_ids[0], last_logits_only=True)
            presents = [t for cache in self.caches for t in cache.present]
        finally:
            self.llm.clear_caches()
        return (logits, *presents)
