"""A second renderer of the synthetic questions, for evaluation only.

The training images come from one generator (synthetic.py): hard-edged shapes on a near-white
background at 160-320 px, nine fixed aspect ratios. A model can learn that generator instead of the
task, and a held-out split drawn by the same code cannot tell. This renderer asks the same five
questions with the same answer words (templates and answers are shared; none of the drawing code
is) about pictures drawn differently: anti-aliased shapes (drawn 4x larger and downsampled) with
proportions and outlines of their own, free placement, tinted, gradient and noisy backgrounds, other
tints of each colour, numbers at other sizes and weights, any aspect ratio from 1:4 to 4:1, long sides
from 150 to 600 px (short sides of 48 px at least), and some images JPEG re-encoded.

Every image keeps its drawing record (what was drawn where) next to its question, and the answer is
read from that record; tests check the records against the pixels. Deterministic: image i depends on
(seed, i) only. Output: the LLaVA json of synthetic.py (`{split}.json` + `images/`), one question per
image, `renderer: "independent"`.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sphinx_edge.io import atomic_path
from sphinx_edge.train.synthetic import (COLOURS, DOMAINS, IMAGE_TOKEN, PLURALS, QUESTIONS, SHAPES, nearest_aspect,
                                         seeded_rng)

SUPERSAMPLE = 4
LONG_SIDE = (150, 600)
MIN_SHORT_SIDE = 48
ASPECT_RANGE = (0.25, 4.0)  # width / height
JPEG_SHARE = 0.3
# The same colour words, other tints: a fixed shift per colour and a random one per shape.
TINT_SHIFT = 18


def _rng(seed: int, *parts) -> random.Random:
    return seeded_rng("sphinx-edge-independent", seed, *parts)


def _tint(rng: random.Random, name: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-TINT_SHIFT, TINT_SHIFT))) for v in COLOURS[name])


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """Flat and tinted, a gradient between two light tints, or light noise over a tint."""
    base = [rng.randint(205, 250) for _ in range(3)]
    kind = rng.choice(("flat", "gradient", "noise"))
    if kind == "flat":
        return Image.new("RGB", (w, h), tuple(base))
    if kind == "gradient":
        other = [min(255, max(190, v + rng.randint(-35, 35))) for v in base]
        ramp = Image.linear_gradient("L").transpose(rng.choice((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                                              Image.Transpose.ROTATE_270, Image.Transpose.FLIP_LEFT_RIGHT)))
        ramp = ramp.resize((w, h))
        return Image.composite(Image.new("RGB", (w, h), tuple(base)), Image.new("RGB", (w, h), tuple(other)), ramp)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(4, 9), (h, w, 1))  # seeded, not Pillow's
    pixels = np.clip(np.asarray(base, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").filter(ImageFilter.GaussianBlur(0.6))


def _outline(rng: random.Random, fill: tuple[int, int, int]) -> tuple[int, int, int] | None:
    return tuple(max(0, v - 90) for v in fill) if rng.random() < 0.35 else None


def _shape_polygons(kind: str, cx: float, cy: float, r: float, rng: random.Random) -> list:
    """The shape as Pillow primitives around (cx, cy) within radius r; own proportions."""
    if kind == "circle":
        return [("ellipse", (cx - r, cy - r, cx + r, cy + r))]
    if kind == "square":
        s = r * rng.uniform(0.72, 0.8)
        return [("polygon", [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)])]
    if kind == "triangle":
        return [("polygon", [(cx, cy - r), (cx + 0.95 * r, cy + 0.7 * r), (cx - 0.95 * r, cy + 0.7 * r)])]
    if kind == "cross":
        t = r * rng.uniform(0.25, 0.33)
        return [("polygon", [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)]),
                ("polygon", [(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)])]
    raise ValueError(f"unknown shape {kind!r}")


class _Canvas:
    """Draws at SUPERSAMPLE x the size and keeps a record of what went where (final pixels)."""

    def __init__(self, rng: random.Random, w: int, h: int) -> None:
        self.rng, self.w, self.h = rng, w, h
        self.image = _background(rng, w * SUPERSAMPLE, h * SUPERSAMPLE)
        self.draw = ImageDraw.Draw(self.image)
        self.record: list[dict] = []

    def shape(self, kind: str, colour: str, cx: float, cy: float, r: float) -> None:
        fill = _tint(self.rng, colour)
        line = _outline(self.rng, fill)
        k = SUPERSAMPLE
        width = max(1, round(r * k * 0.08)) if line else 0
        for primitive, xy in _shape_polygons(kind, cx * k, cy * k, r * k, self.rng):
            if primitive == "ellipse":
                self.draw.ellipse(xy, fill=fill, outline=line, width=width)
            else:
                self.draw.polygon(xy, fill=fill, outline=line, width=width)
        self.record.append({"shape": kind, "colour": colour, "centre": [round(cx, 1), round(cy, 1)],
                            "radius": round(r, 1)})

    def finish(self) -> Image.Image:
        return self.image.resize((self.w, self.h), Image.LANCZOS)


def _place(rng: random.Random, w: int, h: int, n: int, r: float, region=None, tries: int = 4000) -> list:
    """n centres, free placement, no two shapes closer than a gap; `region` (x0, y0, x1, y1) limits them."""
    x0, y0, x1, y1 = region or (0, 0, w, h)
    centres: list[tuple[float, float]] = []
    for _ in range(tries):
        if len(centres) == n:
            break
        c = (rng.uniform(x0 + r + 1, x1 - r - 1), rng.uniform(y0 + r + 1, y1 - r - 1))
        if all(math.dist(c, o) > 2.2 * r for o in centres):
            centres.append(c)
    if len(centres) < n:
        return []
    return centres


def _shapes(rng: random.Random, w: int, h: int, kinds: list[str], colours: list[str]) -> _Canvas:
    # a share of the area per shape, at most a good part of the short side; smaller until they fit
    r = min(rng.uniform(0.18, 0.28) * math.sqrt(w * h / len(kinds)), rng.uniform(0.3, 0.42) * min(w, h))
    while not (centres := _place(rng, w, h, len(kinds), r)):
        r *= 0.9
    canvas = _Canvas(rng, w, h)
    for kind, colour, (cx, cy) in zip(kinds, colours, centres):
        canvas.shape(kind, colour, cx, cy, r)
    return canvas


def _colour(rng, w, h):
    k = rng.randint(1, 3)
    kinds, colours = rng.sample(SHAPES, k), rng.sample(list(COLOURS), k)
    canvas = _shapes(rng, w, h, kinds, colours)
    j = rng.randrange(k)
    return canvas, QUESTIONS["colour"].format(shape=kinds[j]), colours[j]


def _count(rng, w, h):
    n = rng.randint(1, 6)
    kind = rng.choice(SHAPES)
    canvas = _shapes(rng, w, h, [kind] * n, [rng.choice(list(COLOURS))] * n)
    return canvas, QUESTIONS["count"].format(shapes=PLURALS[kind]), str(n)


def _shape(rng, w, h):
    kind = rng.choice(SHAPES)
    canvas = _shapes(rng, w, h, [kind], [rng.choice(list(COLOURS))])
    return canvas, QUESTIONS["shape"], kind


def _text(rng, w, h):
    digits = rng.randint(1, 3)
    number = str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1))
    canvas = _Canvas(rng, w, h)
    k = SUPERSAMPLE
    size = int(min(w, h) * rng.uniform(0.35, 0.7) * k)
    stroke = rng.choice((0, 0, max(1, size // 40)))
    font = ImageFont.load_default(size=size)
    l, t, r, b = canvas.draw.textbbox((0, 0), number, font=font, stroke_width=stroke)
    while (r - l > 0.92 * w * k or b - t > 0.9 * h * k) and size > 8 * k:
        size = int(size * 0.9)
        font = ImageFont.load_default(size=size)
        l, t, r, b = canvas.draw.textbbox((0, 0), number, font=font, stroke_width=stroke)
    x = rng.uniform(0, max(0, w * k - (r - l))) - l
    y = rng.uniform(0, max(0, h * k - (b - t))) - t
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    canvas.draw.text((x, y), number, font=font, fill=ink, stroke_width=stroke, stroke_fill=ink)
    canvas.record.append({"text": number, "box": [round((x + l) / k, 1), round((y + t) / k, 1),
                                                   round((x + r) / k, 1), round((y + b) / k, 1)]})
    return canvas, QUESTIONS["text"], number


def _position(rng, w, h):
    tall = h > w
    kinds = [rng.choice(SHAPES), rng.choice(SHAPES)]
    colours = rng.sample(list(COLOURS), 2)
    long_, short = (h, w) if tall else (w, h)
    r = min(long_ * rng.uniform(0.08, 0.15), short * rng.uniform(0.25, 0.4))
    halves = [(0, 0, long_ / 2 - 0.03 * long_, short), (long_ / 2 + 0.03 * long_, 0, long_, short)]
    while not all(centres := [_place(rng, long_, short, 1, r, region) for region in halves]):
        r *= 0.9
    canvas = _Canvas(rng, w, h)
    for kind, colour, [(a, b)] in zip(kinds, colours, centres):
        canvas.shape(kind, colour, *((b, a) if tall else (a, b)), r)
    j = rng.randrange(2)
    sides = ("top", "bottom") if tall else ("left", "right")
    return canvas, QUESTIONS["position"].format(colour=colours[j], shape=kinds[j]), sides[j]


_DOMAINS = {"colour": _colour, "count": _count, "shape": _shape, "text": _text, "position": _position}
assert set(_DOMAINS) == set(DOMAINS)


def render(seed: int, i: int, domain: str) -> tuple[Image.Image, str, str, list[dict]]:
    """Image i of a set: (image, question, answer, drawing record)."""
    rng = _rng(seed, i)
    aspect = math.exp(rng.uniform(*map(math.log, ASPECT_RANGE)))
    long_side = rng.randint(*LONG_SIDE)
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    grow = max(1.0, MIN_SHORT_SIDE / min(w, h))  # legible at the model's input size
    w, h = round(w * grow), round(h * grow)
    canvas, question, answer = _DOMAINS[domain](rng, w, h)
    return canvas.finish(), question, answer, canvas.record


def generate(out_dir: str | Path, n: int, *, seed: int = 0, split: str = "test") -> Path:
    """n images (the five domains in turn) and `{split}.json` in `out_dir`; returns the json's path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        domain = DOMAINS[i % len(DOMAINS)]
        image, question, answer, drawn = render(seed, i, domain)
        jpeg = _rng(seed, i, "jpeg").random() < JPEG_SHARE
        name = f"images/{split}_{i:06d}.{'jpg' if jpeg else 'png'}"
        with atomic_path(out_dir / name) as tmp:
            if jpeg:
                image.save(tmp, format="JPEG", quality=_rng(seed, i, "quality").randint(60, 90))
            else:
                image.save(tmp, format="PNG")
        records.append({"id": f"{split}_{i:06d}", "image": name, "domain": domain, "renderer": "independent",
                        "aspect": nearest_aspect(*image.size), "size": list(image.size), "drawn": drawn,
                        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                                          {"from": "gpt", "value": answer}]})
    path = out_dir / f"{split}.json"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path
