"""PyTorch eager as a runtime backend: the benchmark's reference row.

It runs the same three components the exports hold (`export.graphs`), on the model the export
was made from (the manifest's `source`), behind the runtime's backend interface, so every
backend is timed by the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sphinx_edge.export.graphs import TextDecoder, TokenEmbedding, VisionEncoder
from sphinx_edge.model.sphinx import SphinxModel


class TorchBackend:
    name = "torch"

    def __init__(self, model: SphinxModel, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        model = model.eval()
        self.vision, self.embedding, self.decoder = VisionEncoder(model), TokenEmbedding(model), TextDecoder(model)
        self.max_seq_len = model.config.llm.max_seq_len
        model.llm.setup_caches(max_seq_len=self.max_seq_len)
        self.length = 0

    @torch.inference_mode()
    def encode_views(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision(torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))).numpy()

    @torch.inference_mode()
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedding(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])[0].numpy()

    @torch.inference_mode()
    def forward(self, embeds: np.ndarray) -> np.ndarray:
        T = embeds.shape[0]
        positions = torch.arange(self.length, self.length + T)
        logits = self.decoder(torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))[None], positions)
        self.length += T
        return logits[0, -1].numpy()

    def truncate(self, length: int) -> None:
        self.length = length  # a static cache, as in the ExecuTorch program: the causal mask hides stale slots


def source_model(manifest: dict, export_dir: Path) -> SphinxModel:
    """The PyTorch model an export was made from, by the manifest's `source` record."""
    from sphinx_edge.bundled import bundled_weights
    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.config import SphinxConfig
    from sphinx_edge.model.sphinx import build_model

    source = manifest.get("source") or {}
    config = SphinxConfig.from_dict(manifest["model"]["config"])
    if source.get("random_init"):
        return build_model(config, seed=source.get("seed", 0))
    checkpoint = bundled_weights(source["bundled"]) if "bundled" in source else source.get("checkpoint")
    if not checkpoint or not Path(checkpoint).exists():
        raise FileNotFoundError(f"{export_dir}: the checkpoint it was exported from ({checkpoint or 'not recorded'}) "
                                "is not here, so there is no PyTorch reference to time")
    return load_model(checkpoint, config.name)
