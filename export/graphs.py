"""The three exported components of a SPHINX model, as plain nn.Modules over its weights.

* `VisionEncoder`: packed views [N, 3, tile + dino, tile] (`layout.pack_views`) -> image
  embeddings [N, tokens_per_view, dim], start_img / end_img included. N is dynamic; a runtime
  passes the encoded views only, so fully padded tiles cost nothing.
* `TokenEmbedding`: ids [1, L] -> [1, L, dim] over the text vocabulary plus the three image
  specials (skip, start_img, end_img at ids vocab, vocab + 1, vocab + 2), so any runner can place
  a skip tile as a plain token (docs/design.md, section 3).
* `TextDecoder` (ExecuTorch): embeddings [1, L, dim] + positions [L] -> last-token logits
  [1, 1, vocab], with the static KV cache inside as mutable buffers.
* `PastKVDecoder` (ONNX): the optimum / transformers.js contract: `inputs_embeds`,
  `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` in, `logits` and
  `present.{i}.key|value` out; the cache travels as graph inputs and outputs.

The decoders reuse the model's own layers; only the cache object differs.
"""

from __future__ import annotations

import torch
from torch import nn

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


class TextDecoder(nn.Module):
    """Static-cache decoder for ExecuTorch: call `model.llm.setup_caches(...)` before exporting."""

    def __init__(self, model: SphinxModel) -> None:
        super().__init__()
        self.llm = model.llm

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds, input_pos, last_logits_only=True)


class PastKV(nn.Module):
    """A KV cache that concatenates the past (a graph input) with the new keys and values, and
    keeps the result as the present (a graph output). Duck-types `llm.KVCache`."""

    def __init__(self) -> None:
        super().__init__()
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key_mask: torch.Tensor | None = None  # [past + T] bool, from attention_mask

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.present = (torch.cat([self.past[0], k], dim=2), torch.cat([self.past[1], v], dim=2))
        return self.present

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        # Keys sit at positions 0 .. past + T - 1 (batch 1, no left padding).
        key_pos = torch.arange(self.key_mask.shape[0], device=input_pos.device)
        return (key_pos[None, :] <= input_pos[:, None]) & self.key_mask[None, :]


class PastKVDecoder(nn.Module):
    def __init__(self, model: SphinxModel) -> None:
        super().__init__()
        self.llm = model.llm
        self.caches = nn.ModuleList(PastKV() for _ in self.llm.layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key_mask = attention_mask[0] > 0
        for i, (layer, cache) in enumerate(zip(self.llm.layers, self.caches)):
            cache.past = (past_key_values[2 * i], past_key_values[2 * i + 1])
            cache.key_mask = key_mask
            layer.attention.kv_cache = cache
        try:
            logits = self.llm(inputs_embeds, position_ids[0], last_logits_only=True)
            presents = [t for cache in self.caches for t in cache.present]
        finally:
            self.llm.clear_caches()
        return (logits, *presents)


def decoder_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """ONNX input and output names of `PastKVDecoder`, in order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]
