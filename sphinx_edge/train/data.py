"""Training data: LLaVA-format conversations -> supervised examples, and a weighted dataset mixture.

An example is the text token ids (BOS first), the image views of its tile plan, and a target per
position of the FULL sequence (BOS, image tokens, text): `targets[i]` is the token at i + 1 when
that token lies in an assistant answer (its closing "\\n###" and the final EOS included), else
IGNORE. Torch-free: collation into tensors happens in the recipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sphinx_edge.config import SphinxConfig
from sphinx_edge.layout import ImageLoadError, image_segments, preprocess
from sphinx_edge.prompt import VQA_SUFFIX, conversation_pieces
from sphinx_edge.tokenizer import Tokenizer

IGNORE = -100
ROLES = {"human": "human", "user": "human", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    pass


@dataclass
class Example:
    text_ids: np.ndarray  # [T] int64, BOS first
    targets: np.ndarray  # [L] int64 over the full sequence, L = T + image tokens
    convnext_views: np.ndarray | None  # [V, 3, tile, tile]
    dinov2_views: np.ndarray | None  # [V, 3, dino, dino]
    segments: list[tuple[str, int]]


def read_conversations(json_path: str | os.PathLike) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """[(image path or None, [(question, answer), ...])] from a LLaVA conversation JSON file."""
    path = Path(json_path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of conversations")
    out = []
    for n, rec in enumerate(records):
        where = f"{path} record {n} (id {rec.get('id', '?')!r})" if isinstance(rec, dict) else f"{path} record {n}"
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not turns or len(turns) % 2:
            raise DataError(f"{where}: 'conversations' must hold human/assistant pairs")
        pairs = []
        for q, a in zip(turns[::2], turns[1::2]):
            if ROLES.get(q.get("from")) != "human" or ROLES.get(a.get("from")) != "assistant":
                raise DataError(f"{where}: turns must alternate human, assistant")
            pairs.append((q["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip(),
                          a["value"].strip()))
        image = rec.get("image")
        out.append((str(path.parent / image) if image else None, pairs))
    return out


class ConversationDataset:
    """One LLaVA JSON file; `dataset[i]` is an Example (images are loaded and tiled on access)."""

    def __init__(self, json_path: str | os.PathLike, tokenizer: Tokenizer, config: SphinxConfig, *,
                 max_len: int, vqa_suffix: bool = False) -> None:
        self.records = read_conversations(json_path)
        self.name = Path(json_path).stem
        self.tokenizer, self.config, self.max_len, self.vqa_suffix = tokenizer, config, max_len, vqa_suffix

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        image, pairs = self.records[index]
        if self.vqa_suffix:
            pairs = [(q + VQA_SUFFIX, a) for q, a in pairs]
        return encode_example(pairs, image, self.tokenizer, self.config, self.max_len)


def encode_example(pairs: list[tuple[str, str]], image: str | None, tokenizer: Tokenizer,
                   config: SphinxConfig, max_len: int) -> Example:
    pieces = conversation_pieces(pairs)
    text = "".join(p for p, _ in pieces)
    ids, starts = tokenizer.encode_with_offsets(text, bos=True)
    spans, pos = [], 0
    for piece, supervised in pieces:
        if supervised:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    supervised = [i > 0 and any(a <= s < b for a, b in spans) for i, s in enumerate(starts)]
    ids.append(tokenizer.eos_id)
    supervised.append(True)

    cv = dv = None
    segments: list[tuple[str, int]] = []
    n_image = 0
    if image is not None:
        try:
            plan, cv, dv = preprocess(image, layout=config.layout, grid=config.grid,
                                      tile_size=config.convnext.image_size, dino_size=config.dinov2.image_size)
        except ImageLoadError as e:
            raise DataError(str(e)) from e
        segments = image_segments(plan)
        n_image = plan.n_image_tokens(config.tokens_per_view)
    # The full sequence is BOS, n_image image tokens, ids[1:]; position i predicts position i + 1.
    tokens = np.array([ids[0]] + [IGNORE] * n_image + ids[1:], dtype=np.int64)
    wanted = np.array([False] * (1 + n_image) + supervised[1:])
    targets = np.append(np.where(wanted[1:], tokens[1:], IGNORE), IGNORE)
    length = len(ids) + n_image
    if length > max_len:
        keep_text = max_len - n_image
        if keep_text < 2:
            raise DataError(f"the image alone takes {n_image} tokens; max_len is {max_len}")
        ids, targets = ids[:keep_text], targets[:max_len]
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=np.int64), cv, dv, segments)


class Mixture:
    """Batches drawn from weighted datasets, each batch from ONE dataset (as SPHINX's reference does).

    Stateless: batch `step` is a pure function of (seed, step), so resuming needs only the step.
    Every rank draws the same dataset and the same global batch, then takes its own slice.
    """

    def __init__(self, datasets: list[ConversationDataset], weights: list[float], batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("give one weight per dataset")
        w = np.asarray(weights, dtype=np.float64)
        self.datasets, self.p = datasets, w / w.sum()
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def indices(self, step: int) -> tuple[int, list[int]]:
        rng = np.random.default_rng([self.seed, step])
        d = int(rng.choice(len(self.datasets), p=self.p))
        picks = rng.integers(0, len(self.datasets[d]), self.batch_size * self.world_size)
        return d, picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def batch(self, step: int) -> list[Example]:
        d, picks = self.indices(step)
        return [self.datasets[d][i] for i in picks]
