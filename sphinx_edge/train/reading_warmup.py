"""A reading warm-up for a model's two visual experts: every token is told which characters lie under it.

Nano's experts learn colour and shape from answers but not to read: after the question-answer warm-up
(encoder_warmup.py) and the LLM's own loss, words, chart labels and table cells stay at 1-18 %
(benchmarks/RESULTS.md) although the tiles show the text legibly. Those signals are one short answer
per image. Here the signal is dense: canvases of text (words, letters, numbers, column names in the
varied look's fonts, sizes and backgrounds, with shapes and rules as distractors; painters.py) are cut
into the views the LLM gets (layout.preprocess: the global view and the tiles), each token's square
is split 2 x 2, and a small head on each token alone names the character whose centre lies in each
sub-cell (a-z, 0-9, case folded) or none. A sub-cell with two centres, or with a glyph too small to
read at that view's scale, is left out of the loss. The head is thrown away; the experts go into a
model directory that the one-stage recipe starts from (`init = ...`).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from sphinx_edge.config import SphinxConfig
from sphinx_edge.layout import preprocess
from sphinx_edge.model.sphinx import SphinxModel
from sphinx_edge.train.encoder_warmup import train_experts
from sphinx_edge.train.painters import COLOURS, SHAPES, VARIED_FONTS, _face, _varied_background, draw_shape
from sphinx_edge.train.synthetic import TABLE_COLUMNS, WORDS

CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"  # class k + 1; 0 is "no character here"
IGNORE = -100
SUB = 2  # sub-cells per token side
TEXT_HEIGHT = (7 / 256, 80 / 256)  # of the canvas side, log-uniform
MIN_READABLE = (6.0, 2.5)  # a glyph under this height / width in a view's pixels has no target there


class Glyph(NamedTuple):
    """A drawn character: its centre on the canvas, class (1 + index in CHARACTERS) and size in pixels."""

    x: float
    y: float
    label: int
    width: float
    height: float


def canvas_side(config: SphinxConfig) -> int:
    """The canvas of a square image: grid x tile pixels, every tile encoded."""
    return config.grid * config.convnext.image_size


def _text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        s = rng.choice(WORDS)
    elif r < 0.55:
        s = "".join(rng.choice(CHARACTERS[:26]) for _ in range(rng.randint(1, 7)))
    elif r < 0.85:
        s = str(rng.randint(0, 999 if rng.random() < 0.6 else 99))
    else:
        s = rng.choice(TABLE_COLUMNS)
    return rng.choice((s, s, s.title(), s.upper()))


def draw_text_canvas(rng: random.Random, side: int) -> tuple[Image.Image, list[Glyph]]:
    """A side x side picture of 1-7 non-overlapping strings (sometimes among shapes and rules), and its glyphs."""
    img, _ = _varied_background(rng, side, side)
    draw = ImageDraw.Draw(img)
    k = side / 256  # the sizes below are for Nano's 256 px canvas
    if rng.random() < 0.4:
        for _ in range(rng.randint(1, 4)):
            cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(6, 40) * k
            draw_shape(draw, rng.choice(SHAPES), cx, cy, r, COLOURS[rng.choice(list(COLOURS))])
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                y = rng.uniform(0, side)
                draw.line([(rng.uniform(0, 60 * k), y), (rng.uniform(190 * k, side), y)], fill=(90, 90, 90), width=1)
    glyphs: list[Glyph] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(rng.randint(1, 7)):
        text = _text(rng)
        height = math.exp(rng.uniform(*(math.log(h * side) for h in TEXT_HEIGHT)))
        font = _face(rng.choice(VARIED_FONTS), max(6, int(round(height))))
        left, top, right, bottom = font.getbbox(text)
        if right - left >= side - 4 or bottom - top >= side - 4:
            continue
        x, y = rng.uniform(-left + 2, side - right - 2), rng.uniform(-top + 2, side - bottom - 2)
        box = (x + left - 2, y + top - 2, x + right + 2, y + bottom + 2)
        if any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in boxes):
            continue
        boxes.append(box)
        if rng.random() < 0.6:
            ink = tuple(rng.randint(0, 70) for _ in range(3))
        else:
            ink = tuple(max(0, v - rng.randint(0, 60)) for v in COLOURS[rng.choice(list(COLOURS))])
        draw.text((x, y), text, font=font, fill=ink)
        centre_y = y + (top + bottom) / 2
        for i, ch in enumerate(text):
            if ch != " ":
                a, b = font.getlength(text[:i]), font.getlength(text[:i + 1])
                glyphs.append(Glyph(x + (a + b) / 2, centre_y, CHARACTERS.index(ch.lower()) + 1, b - a, bottom - top))
    if rng.random() < 0.25:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(40, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img, glyphs


def sub_cell_targets(glyphs: list[Glyph], view: int, side: int, config: SphinxConfig) -> np.ndarray:
    """[n, n] classes of one view's sub-cells (n = SUB x tokens per side): view 0 is the global view (the
    canvas scaled to a tile), view 1 + i the i-th tile, row-major."""
    tile = config.convnext.image_size
    n = SUB * math.isqrt(config.convnext.n_patches)
    cell = tile / n
    if view == 0:
        scale, ox, oy = tile / side, 0, 0
    else:
        per_row = side // tile
        scale, ox, oy = 1.0, (view - 1) % per_row * tile, (view - 1) // per_row * tile
    labels = np.zeros((n, n), np.int64)
    hits = np.zeros((n, n), np.int64)
    for g in glyphs:
        vx, vy = (g.x - ox) * scale, (g.y - oy) * scale
        if not (0 <= vx < tile and 0 <= vy < tile):
            continue
        cx, cy = int(vx // cell), int(vy // cell)
        hits[cy, cx] += 1
        labels[cy, cx] = g.label
        if g.height * scale < MIN_READABLE[0] * tile / 128 or g.width * scale < MIN_READABLE[1] * tile / 128:
            hits[cy, cx] += 2
    labels[hits > 1] = IGNORE
    return labels


def text_sample(rng: random.Random, config: SphinxConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ConvNeXt views, DINOv2 views, [views, n, n] targets) of one text canvas, as the model sees it."""
    side = canvas_side(config)
    img, glyphs = draw_text_canvas(rng, side)
    plan, cv, dv = preprocess(img, layout=config.layout, grid=config.grid, tile_size=config.convnext.image_size,
                              dino_size=config.dinov2.image_size)
    assert plan.view_tiles == tuple(range(config.grid ** 2)), "a square canvas encodes every tile"
    return cv, dv, np.stack([sub_cell_targets(glyphs, v, side, config) for v in range(len(cv))])


class TextBatches(torch.utils.data.IterableDataset):
    """Endless batches of `canvases` text canvases' views and targets, the same for a seed."""

    def __init__(self, config: SphinxConfig, seed: int, canvases: int) -> None:
        self.config, self.seed, self.canvases = config, seed, canvases

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        rng = random.Random(self.seed)
        while True:
            parts = zip(*[text_sample(rng, self.config) for _ in range(self.canvases)])
            yield tuple(torch.from_numpy(np.concatenate(p)) for p in parts)


class ReadingHead(nn.Module):
    """Each patch token alone -> the classes of its SUB x SUB sub-cells. Reading one token at a time
    puts what is written under a token into that token's features: what the LLM reads."""

    def __init__(self, vision_dim: int, tokens_per_side: int, width: int = 256) -> None:
        super().__init__()
        self.side = tokens_per_side
        self.net = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, width), nn.GELU(),
                                 nn.Linear(width, SUB * SUB * (len(CHARACTERS) + 1)))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, side x side, vision_dim] row-major patch tokens -> [N, SUB x side, SUB x side, classes] logits."""
        n, s = patches.shape[0], self.side
        x = self.net(patches).view(n, s, s, SUB, SUB, -1)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(n, s * SUB, s * SUB, -1)


def _patches(model: SphinxModel, convnext: torch.Tensor, dinov2: torch.Tensor) -> torch.Tensor:
    return model.visual_features(convnext, dinov2)[:, 1:]  # token 0 is the pooled one


def reading_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the sub-cells with a character plus half that over the empty ones (most are empty);
    a batch without one kind (tiny test canvases) leaves that term at zero, not NaN."""
    flat = targets.flatten()
    per = F.cross_entropy(logits.flatten(0, -2), flat.clamp(min=0), reduction="none")
    written, empty = flat > 0, flat == 0
    return per[written].sum() / written.sum().clamp(min=1) + 0.5 * per[empty].sum() / empty.sum().clamp(min=1)


def warmup_reading(model: SphinxModel, *, steps: int, canvases: int = 24, lr: float = 1e-3, seed: int = 0,
                   warmup_steps: int = 50, log: Callable[[str], None] = print,
                   log_every: int = 50) -> tuple[ReadingHead, list[dict]]:
    """Trains model.convnext and model.dinov2 in place; returns the head and log rows ({"step", "loss",
    "accuracy"}: sub-cells with a character named right, on the batch)."""
    torch.manual_seed(seed)
    config = model.config
    head = ReadingHead(config.vision_dim, math.isqrt(config.convnext.n_patches))

    def step_loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, float]:
        convnext, dinov2, targets = batch
        logits = head(_patches(model, convnext, dinov2))
        written = targets > 0
        right = (logits.argmax(-1)[written] == targets[written]).sum().item()
        return reading_loss(logits, targets), right / max(1, int(written.sum()))

    # One process draws canvases while the trainer's threads run the experts.
    batches = torch.utils.data.DataLoader(TextBatches(config, seed, canvases), batch_size=None, num_workers=1)
    rows = train_experts(model, head, batches, step_loss, steps=steps, lr=lr, warmup_steps=warmup_steps, log=log,
                         log_every=log_every, measure="characters read")
    return head.eval(), rows


@torch.no_grad()
def reading_accuracy(model: SphinxModel, head: ReadingHead, *, canvases: int = 400, seed: int = 12345) -> dict:
    """Sub-cells with a character named right on fresh canvases, for the global view and for the tiles."""
    rng = random.Random(seed)
    hits = {"global": [0, 0], "tiles": [0, 0]}
    views = 1 + model.config.grid ** 2
    for start in range(0, canvases, 20):
        parts = zip(*[text_sample(rng, model.config) for _ in range(min(20, canvases - start))])
        convnext, dinov2, targets = (torch.from_numpy(np.concatenate(p)) for p in parts)
        predicted = head(_patches(model, convnext, dinov2)).argmax(-1)
        for i in range(len(targets)):
            written = targets[i] > 0
            kind = hits["global" if i % views == 0 else "tiles"]
            kind[0] += int((predicted[i][written] == targets[i][written]).sum())
            kind[1] += int(written.sum())
    return {k: right / max(1, total) for k, (right, total) in hits.items()}


def main(out: str, *, init: str | None, size: str = "nano", steps: int = 1200, canvases: int = 24,
         lr: float = 1e-3, seed: int = 0, tokenizer: str | None = None, eval_canvases: int = 400) -> tuple[Path, dict]:
    """Warm up `size`'s experts on reading and save a model directory at `out` (everything but the
    experts as `init` holds it, with its tokenizer, or as `build_model(seed=seed)` draws it); returns
    the directory and `reading_accuracy`."""
    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.checkpoints.native import save_native
    from sphinx_edge.config import get_config
    from sphinx_edge.model.sphinx import build_model

    model = build_model(get_config(size), seed=seed) if init is None else load_model(init, size)
    if tokenizer is None and init is not None and (Path(init) / "tokenizer.model").is_file():
        tokenizer = str(Path(init) / "tokenizer.model")  # the LLM kept from init keeps its tokenizer
    head, _ = warmup_reading(model, steps=steps, canvases=canvases, lr=lr, seed=seed,
                             log=lambda s: print(s, flush=True))
    accuracy = reading_accuracy(model, head, canvases=eval_canvases)
    print(f"characters read on fresh canvases: global view {accuracy['global']:.1%}, tiles {accuracy['tiles']:.1%}",
          flush=True)
    path = save_native(model, out, tokenizer=tokenizer)
    print(f"saved {path}", flush=True)
    return path, accuracy
