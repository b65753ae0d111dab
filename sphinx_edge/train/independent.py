"""A second renderer of the synthetic questions, for evaluation only.

The training images come from one generator (synthetic.py with painters.py). A model can learn that
generator instead of the task, and a held-out split drawn by the same code cannot tell. This renderer
asks the same nine domains' questions (each template's canonical wording) with the same answer words;
templates and answers are shared, none of the drawing code is, and none of the fonts: text here is set
in Pillow's Aileron and matplotlib's Computer Modern and STIX faces, which the training generator never
uses. Pictures: anti-aliased shapes (drawn 4x larger and downsampled) with proportions and outlines of
their own, free placement, tinted, gradient and noisy backgrounds, other tints of each colour, numbers
and words at other sizes and weights, bar charts with a baseline and values at the bars' ends, tables
with a tinted header band and left-aligned cells, square number tags at the shapes' upper right, any
aspect ratio from 1:4 to 4:1, long sides from 150 to 600 px (short sides of 48 px at least), and some
images JPEG re-encoded.

Every image keeps its drawing record (what was drawn where, in the form synthetic.py's varied look
writes) next to its question, and the answer is read from that record; tests check the records against
the pixels. Deterministic: image i depends on (seed, i) only. Output: the LLaVA json of synthetic.py
(`{split}.json` + `images/`), one question per image, `renderer: "independent"`.
"""

from __future__ import annotations

import json
import math
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sphinx_edge.io import atomic_path
from sphinx_edge.train.synthetic import (CHART_LABELS, COLOURS, DOMAINS, IMAGE_TOKEN, PLURALS, QUESTIONS, SHAPES,
                                         TABLE_COLUMNS, TEMPLATES, WORDS, nearest_aspect, seeded_rng)

SUPERSAMPLE = 4
LONG_SIDE = (150, 600)
MIN_SHORT_SIDE = 48
ASPECT_RANGE = (0.25, 4.0)  # width / height
JPEG_SHARE = 0.3
# Typefaces the training generator never uses: Pillow's own (Aileron) and four of matplotlib's.
FACES = ("aileron", "cmr10.ttf", "cmss10.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf")
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


@lru_cache(maxsize=1024)  # each text looks its face up: read each font file once per size
def _face(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "aileron":
        return ImageFont.load_default(size=size)
    import matplotlib  # the typefaces' files ship with it (a dependency of the train extra)

    return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / name), size)


def _write(canvas: _Canvas, text: str, x: float, y: float, height: float, ink, face: str, anchor: str = "lm") -> None:
    """Text whose capitals are about `height` tall, anchored at (x, y) (Pillow anchors), recorded."""
    k = SUPERSAMPLE
    font = _face(face, max(6, round(height * k * 1.4)))
    box = canvas.draw.textbbox((x * k, y * k), text, font=font, anchor=anchor)
    canvas.draw.text((x * k, y * k), text, font=font, fill=ink, anchor=anchor)
    canvas.record.append({"text": text, "box": [round(v / k, 1) for v in box]})


def _words(rng, w, h):
    phrase = " ".join(rng.sample(WORDS, 1 if rng.random() < 0.6 else 2))
    shown = rng.choice((phrase, phrase.capitalize(), phrase.upper()))
    canvas, face = _Canvas(rng, w, h), rng.choice(FACES)
    height = min(h * rng.uniform(0.25, 0.5), w / (0.75 * len(shown) + 1))
    while True:  # shrink until it fits in the width
        font = _face(face, max(6, round(height * SUPERSAMPLE * 1.4)))
        l, _, r, _ = canvas.draw.textbbox((0, 0), shown, font=font)
        if r - l <= 0.94 * w * SUPERSAMPLE or height < 6:
            break
        height *= 0.9
    x = rng.uniform(0.03 * w, max(0.03 * w, w - (r - l) / SUPERSAMPLE - 0.03 * w))
    y = rng.uniform(0.5 * height + 2, h - 0.5 * height - 2) if h > height + 4 else h / 2
    _write(canvas, shown, x, y, height, tuple(rng.randint(0, 80) for _ in range(3)), face)
    return canvas, TEMPLATES["words"][0], phrase


def _chart(rng, w, h):
    """Bars from a baseline, each letter beside its bar and the value at the bar's end; one colour per chart
    or per bar; tall pictures' bars grow to the right."""
    n = rng.randint(3, 5)
    values, labels = rng.sample(range(1, 10), n), CHART_LABELS[:n]
    names = rng.sample(list(COLOURS), n) if rng.random() < 0.5 else [rng.choice(list(COLOURS))] * n
    horizontal = h > w
    long_, short = (h, w) if horizontal else (w, h)
    pitch = long_ * 0.92 / n
    size = min(short * 0.075, pitch * 0.4)
    face, ink = rng.choice(FACES), tuple(rng.randint(0, 70) for _ in range(3))
    canvas = _Canvas(rng, w, h)
    base = 2.2 * size if horizontal else h - 2.2 * size
    reach = (w - 2.2 * size - base) if horizontal else -(base - 2.2 * size)
    k = SUPERSAMPLE
    for i, (v, label, name) in enumerate(zip(values, labels, names)):
        mid = long_ * 0.04 + pitch * (i + 0.5)
        tip, half = base + reach * v / 9, pitch * 0.32
        box = (base, mid - half, tip, mid + half) if horizontal else (mid - half, tip, mid + half, base)
        canvas.draw.rectangle([c * k for c in box], fill=_tint(rng, name))
        if horizontal:
            _write(canvas, label, base - 0.5 * size, mid, size, ink, face, "rm")
            _write(canvas, str(v), tip + 0.4 * size, mid, size, ink, face, "lm")
        else:
            _write(canvas, label, mid, base + 0.5 * size, size, ink, face, "mt")
            _write(canvas, str(v), mid, tip - 0.4 * size, size, ink, face, "mb")
        canvas.record.append({"item": "bar", "label": label, "value": v, "colour": name, "at": round(mid, 1),
                              "base": round(base, 1), "tip": round(tip, 1), "horizontal": horizontal})
    line = [(base * k, long_ * 0.03 * k), (base * k, long_ * 0.97 * k)] if horizontal else \
        [(long_ * 0.03 * k, base * k), (long_ * 0.97 * k, base * k)]
    canvas.draw.line(line, fill=ink, width=max(1, round(short * 0.01 * k)))
    j = rng.randrange(n)
    question, answer = rng.choice(((TEMPLATES["chart_max"][0].format(item="bar"), labels[values.index(max(values))]),
                                   (TEMPLATES["chart_min"][0].format(item="bar"), labels[values.index(min(values))]),
                                   (TEMPLATES["chart_value"][0].format(item="bar", label=labels[j]), str(values[j]))))
    return canvas, question, answer


def _table(rng, w, h):
    """Left-aligned cells under a tinted header band, a rule under each row."""
    ncols, nrows = (rng.randint(2, 3) if w > h else 2), rng.randint(2, 3)
    columns = rng.sample(TABLE_COLUMNS, ncols)
    values = [[rng.randint(1, 99) for _ in columns] for _ in range(nrows)]
    row_h = min(h * 0.9 / (nrows + 1), w * 0.9 / (ncols * 2.6))
    col_w = min(row_h * 2.6, w * 0.95 / ncols)
    x0, y0 = rng.uniform(0, w - col_w * ncols), rng.uniform(0, h - row_h * (nrows + 1))
    canvas, face = _Canvas(rng, w, h), rng.choice(FACES)
    ink, k = tuple(rng.randint(0, 70) for _ in range(3)), SUPERSAMPLE
    band = _tint(rng, rng.choice(list(COLOURS)))
    band = tuple(int(255 - (255 - c) * 0.3) for c in band)  # a pale version
    canvas.draw.rectangle([x0 * k, y0 * k, (x0 + col_w * ncols) * k, (y0 + row_h) * k], fill=band)
    size = min(row_h * 0.42, col_w * 0.16)
    for r, row in enumerate([columns] + values):
        for c, value in enumerate(row):
            _write(canvas, str(value), x0 + c * col_w + 0.12 * col_w, y0 + (r + 0.5) * row_h, size, ink, face)
        y = (y0 + (r + 1) * row_h) * k
        canvas.draw.line([(x0 * k, y), ((x0 + col_w * ncols) * k, y)], fill=ink, width=max(1, round(row_h * 0.03 * k)))
    canvas.record.append({"table": [list(columns)] + values})
    r, c = rng.randrange(nrows), rng.randrange(ncols)
    return canvas, TEMPLATES["table_cell"][0].format(row=r + 1, column=columns[c]), str(values[r][c])


def _marks(rng, w, h):
    """Shapes with square number tags at their upper right."""
    k_ = rng.randint(2, 4)
    kinds, colours = [rng.choice(SHAPES) for _ in range(k_)], rng.sample(list(COLOURS), k_)
    canvas = _shapes(rng, w, h, kinds, colours)
    shapes = list(canvas.record)
    marks = rng.sample(range(1, k_ + 1), k_)
    face, k = rng.choice(FACES), SUPERSAMPLE
    for mark, shape in zip(marks, shapes):
        (cx, cy), r = shape["centre"], shape["radius"]
        m = max(0.35 * r, 0.03 * max(w, h))
        mx, my = min(w - m - 1, cx + 0.85 * r), max(m + 1, cy - 0.85 * r)
        canvas.draw.rectangle([(mx - m) * k, (my - m) * k, (mx + m) * k, (my + m) * k], fill=(255, 255, 235),
                              outline=(60, 60, 60), width=max(1, round(0.1 * m * k)))
        _write(canvas, str(mark), mx, my, 1.1 * m, (10, 10, 10), face, "mm")
        canvas.record.append({"mark": mark, "centre": [round(mx, 1), round(my, 1)], "radius": round(m, 1),
                              "on": shape["centre"]})
    j = rng.randrange(k_)
    if rng.random() < 0.5:
        return canvas, TEMPLATES["marks_shape"][0].format(mark=marks[j]), kinds[j]
    return canvas, TEMPLATES["marks_colour"][0].format(mark=marks[j]), colours[j]


_DOMAINS = {"colour": _colour, "count": _count, "shape": _shape, "text": _text, "position": _position,
            "words": _words, "chart": _chart, "table": _table, "marks": _marks}
assert tuple(_DOMAINS) == DOMAINS


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


def generate(out_dir: str | Path, n: int, *, seed: int = 0, split: str = "test",
             domains: tuple[str, ...] = DOMAINS) -> Path:
    """n images (the domains in turn) and `{split}.json` in `out_dir`; returns the json's path. With the
    first five domains, the set of session 18 (Nano 1's 68.0 %), byte for byte."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown or not domains:
        raise ValueError(f"unknown domains {unknown}: choose from {', '.join(DOMAINS)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        domain = domains[i % len(domains)]
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
