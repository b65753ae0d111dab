"""How the synthetic training generator draws; synthetic.py says what. Two looks, one table (LOOKS):

* ``plain``: SPHINX-Nano 1's data, kept byte for byte. Hard-edged shapes in grid cells on a
  near-white background, long sides of 160-320 px, the nine aspect ratios exactly, Pillow's
  default font.
* ``varied``: Nano 2's data, varied on purpose so that a model cannot learn one generator instead of
  the task. Shapes are drawn at 2-3x and downsampled (anti-aliased) with a random filter; some are
  outlined or turned a little. Placement and scale are free. Backgrounds are flat, tinted, gradients
  or light noise, and each colour comes in other tints. Text uses seven DejaVu faces (matplotlib's
  copies). Long sides run from 150 to 1500 px (log-uniform), and aspect ratios spread around the
  planned one, from 1:4 to 4:1. Noisy pictures, and some others, are saved as JPEG.

The evaluation-only renderer (independent.py) shares none of this code and none of these fonts.
Coordinates given to a painter are in the final image's pixels.
"""

from __future__ import annotations

import importlib.util
import math
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 185),
    "orange": (245, 135, 20),
}
COLOUR_JITTER = 10  # plain: each channel of a drawn colour is within this of its palette value
VARIED_TINT = 22  # varied: ... within this
# width:height
ASPECTS: tuple[str, ...] = ("1:1", "1:2", "1:3", "1:4", "2:1", "3:1", "4:1", "3:2", "2:3")
LONG_SIDE = (160, 320)  # plain: inclusive range of the image's longer side, pixels
VARIED_LONG_SIDE = (150, 1500)
VARIED_ASPECT_SPREAD = 0.2  # varied: log-ratio spread around the planned aspect
MIN_SHORT_SIDE = 48  # varied: legible once the longer side is resized to Nano's 256 px canvas
VARIED_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
                "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------- geometry


def aspect_ratio(aspect: str) -> float:
    """Width / height of an ``"w:h"`` aspect string."""
    w, h = aspect.split(":")
    return int(w) / int(h)


def image_size(aspect: str, long_side: int) -> tuple[int, int]:
    """(width, height) for an aspect with the given longer side."""
    r = aspect_ratio(aspect)
    if r >= 1:
        return long_side, max(1, round(long_side / r))
    return max(1, round(long_side * r)), long_side


def _grid(w: int, h: int, capacity: int) -> tuple[int, int]:
    """(cols, rows) with at least ``capacity`` cells whose smaller side is as large as possible."""
    best, best_key = (1, 1), None
    for cols in range(1, capacity + 1):
        rows = math.ceil(capacity / cols)
        key = (min(w / cols, h / rows), -cols * rows)
        if best_key is None or key > best_key:
            best, best_key = (cols, rows), key
    return best


def _cells(rng: random.Random, w: int, h: int, k: int, capacity: int, fill: tuple[float, float]):
    """k shape placements (cx, cy) in distinct grid cells plus one common radius r.

    Shapes are confined to their cells with a margin, so distinct shapes are always clearly
    apart (at least ~16% of a cell)."""
    cols, rows = _grid(w, h, max(capacity, k))
    cw, ch = w / cols, h / rows
    m = max(1.5, 0.08 * min(cw, ch))
    r = rng.uniform(*fill) * (min(cw, ch) / 2 - m)
    cells = rng.sample(range(cols * rows), k)
    out = []
    for c in cells:
        x0, y0 = (c % cols) * cw, (c // cols) * ch
        cx = rng.uniform(x0 + m + r, x0 + cw - m - r)
        cy = rng.uniform(y0 + m + r, y0 + ch - m - r)
        out.append((cx, cy))
    return out, r


def shape_polygons(kind: str, cx: float, cy: float, r: float, square: float = 0.86, arm: float = 0.36,
                  turn: float = 0.0) -> list[list[tuple[float, float]]]:
    """A shape's polygon(s) inside the box (cx +- r, cy +- r) (a circle: a 64-gon), turned by `turn`
    radians about its centre."""
    if kind == "circle":
        polys = [[(cx + r * math.cos(2 * math.pi * i / 64), cy + r * math.sin(2 * math.pi * i / 64)) for i in range(64)]]
    elif kind == "square":
        s = square * r
        polys = [[(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]]
    elif kind == "triangle":
        polys = [[(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]]
    elif kind == "cross":
        t = arm * r  # one 12-gon, so that an outline follows the cross's edge only
        corners = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        polys = [[(cx + x, cy + y) for x, y in corners]]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    if turn:
        c, s = math.cos(turn), math.sin(turn)
        polys = [[(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in p] for p in polys]
    return polys


# --------------------------------------------------------------------------- plain (Nano 1)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw a filled, axis-aligned shape inside the box (cx +- r, cy +- r). No antialiasing, so
    every drawn pixel has exactly the fill colour."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = 0.86 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif kind == "cross":
        t = 0.36 * r
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


@lru_cache(maxsize=512)
def _default_font(size: int):
    font = ImageFont.load_default(size=size)
    return font if isinstance(font, ImageFont.FreeTypeFont) else None


def _text_box(font, text: str, xy: tuple[float, float]) -> Box:
    l, t, r, b = font.getbbox(text)
    return (xy[0] + l, xy[1] + t, xy[0] + r, xy[1] + b)


class PlainPainter:
    """Nano 1's look (see the module docstring). Draws straight onto the final image."""

    name = "plain"

    def __init__(self, rng: random.Random, aspect: str) -> None:
        self.rng = rng
        self.w, self.h = image_size(aspect, rng.randint(*LONG_SIDE))
        base = rng.randint(228, 248)
        self.image = Image.new("RGB", (self.w, self.h), tuple(min(255, base + rng.randint(-6, 6)) for _ in range(3)))
        self.draw = ImageDraw.Draw(self.image)
        self.record: list[dict] = []
        self.jpeg = False

    def colour(self, name: str) -> tuple[int, ...]:
        return _jitter(self.rng, COLOURS[name], COLOUR_JITTER)

    def ink(self) -> tuple[int, ...]:
        return tuple(self.rng.randint(0, 60) for _ in range(3))

    def place(self, k: int, capacity: int, fill: tuple[float, float]) -> tuple[list[tuple[float, float]], float]:
        return _cells(self.rng, self.w, self.h, k, capacity, fill)

    def shape(self, kind: str, cx: float, cy: float, r: float, rgb, name: str) -> None:
        draw_shape(self.draw, kind, cx, cy, r, rgb)
        self.record.append({"shape": kind, "colour": name, "centre": [round(cx, 1), round(cy, 1)], "radius": round(r, 1)})

    def big_text(self, text: str, rgb) -> Box:
        """``text`` large (about half the short side tall) anywhere it fits; its box."""
        w, h = self.w, self.h
        rng = self.rng
        size = max(8, int(rng.uniform(0.55, 0.9) * min(w, h)))
        font = _default_font(size)
        if font is None:  # Pillow without FreeType: upscale the fixed bitmap font.
            return self._big_bitmap_text(text, rgb)
        for _ in range(8):
            l, t, r, b = font.getbbox(text)
            scale = min(0.9 * w / (r - l), 0.85 * h / (b - t))
            if scale >= 1:
                break
            size = max(8, int(size * scale))
            font = _default_font(size)
        l, t, r, b = font.getbbox(text)
        x = rng.uniform(0, max(0, w - (r - l)))
        y = rng.uniform(0, max(0, h - (b - t)))
        xy = (round(x - l), round(y - t))
        self.draw.text(xy, text, font=font, fill=rgb)
        return self._note_text(text, _text_box(font, text, xy))

    def _big_bitmap_text(self, text: str, rgb) -> Box:
        rng = self.rng
        font = ImageFont.load_default()
        l, t, r, b = font.getbbox(text)
        mask = Image.new("L", (r - l, b - t), 0)
        ImageDraw.Draw(mask).text((-l, -t), text, font=font, fill=255)
        scale = min(0.9 * self.w / mask.width, 0.85 * self.h / mask.height) * rng.uniform(0.7, 1.0)
        mask = mask.resize((max(1, int(mask.width * scale)), max(1, int(mask.height * scale))), Image.NEAREST)
        x = rng.randint(0, max(0, self.w - mask.width))
        y = rng.randint(0, max(0, self.h - mask.height))
        self.image.paste(Image.new("RGB", mask.size, rgb), (x, y), mask)
        return self._note_text(text, (x, y, x + mask.width, y + mask.height))

    def label(self, text: str, cx: float, cy: float, height: float, rgb, bold: bool = False) -> Box:
        """``text`` centred on (cx, cy), its digits/capitals about ``height`` tall; its box."""
        font = _default_font(max(6, round(height / 0.72)))
        l, t, r, b = font.getbbox(text)
        xy = (round(cx - (l + r) / 2), round(cy - (t + b) / 2))
        self.draw.text(xy, text, font=font, fill=rgb)
        return self._note_text(text, _text_box(font, text, xy))

    def rect(self, box: Box, rgb, outline=None, width: float = 1) -> None:
        self.draw.rectangle(box, fill=rgb, outline=outline, width=max(1, round(width)) if outline else 0)

    def ellipse(self, box: Box, rgb, outline=None, width: float = 1) -> None:
        self.draw.ellipse(box, fill=rgb, outline=outline, width=max(1, round(width)) if outline else 0)

    def line(self, points: list[tuple[float, float]], rgb, width: float) -> None:
        self.draw.line(points, fill=rgb, width=max(1, round(width)))

    def finish(self) -> Image.Image:
        return self.image

    def _note_text(self, text: str, box: Box) -> Box:
        self.record.append({"text": text, "box": [round(v, 1) for v in box]})
        return box


# --------------------------------------------------------------------------- varied (Nano 2)


@lru_cache(maxsize=1)
def _font_dir() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("the varied look draws text in matplotlib's DejaVu fonts: pip install 'sphinx-edge[train]'")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=2048)
def _face(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / name), size)


def _light(rng: random.Random) -> list[int]:
    """A light background colour: near-white or a pastel tint."""
    if rng.random() < 0.5:
        base = rng.randint(232, 252)
        return [min(255, base + rng.randint(-5, 5)) for _ in range(3)]
    return [rng.randint(200, 250) for _ in range(3)]


def _varied_background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, bool]:
    """(background, noisy): flat, a linear gradient at any angle between two light colours, or light
    Gaussian noise drawn at half size and enlarged (grain)."""
    kind = rng.choices(("flat", "gradient", "noise"), weights=(0.5, 0.3, 0.2))[0]
    a = np.asarray(_light(rng), np.float32)
    if kind == "flat":
        return Image.new("RGB", (w, h), tuple(int(v) for v in a)), False
    gen = np.random.default_rng(rng.getrandbits(64))
    if kind == "gradient":
        b = np.asarray(_light(rng), np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :] * math.cos(angle)
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None] * math.sin(angle)
        t = x + y
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        pixels = a + (b - a) * t[..., None]
        return Image.fromarray(pixels.round().astype(np.uint8), "RGB"), False
    grain = gen.normal(0, rng.uniform(2.5, 7.0), (max(1, h // 2), max(1, w // 2), 3)).astype(np.float32)
    grain_img = Image.fromarray(np.clip(grain + 128, 0, 255).astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)
    pixels = a + np.asarray(grain_img, np.float32) - 128
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB"), True


class VariedPainter:
    """Nano 2's look (see the module docstring). Draws at `scale` x the final size, then resizes."""

    name = "varied"

    def __init__(self, rng: random.Random, aspect: str) -> None:
        self.rng = rng
        ratio = aspect_ratio(aspect) * math.exp(rng.uniform(-VARIED_ASPECT_SPREAD, VARIED_ASPECT_SPREAD))
        ratio = min(4.0, max(0.25, ratio))
        long_side = math.exp(rng.uniform(*map(math.log, VARIED_LONG_SIDE)))
        w, h = (long_side, long_side / ratio) if ratio >= 1 else (long_side * ratio, long_side)
        grow = max(1.0, MIN_SHORT_SIDE / min(w, h))
        self.w, self.h = round(w * grow), round(h * grow)
        self.scale = 3 if max(self.w, self.h) <= 400 else 2 if max(self.w, self.h) <= 800 else 1
        self.image, noisy = _varied_background(rng, self.w * self.scale, self.h * self.scale)
        self.draw = ImageDraw.Draw(self.image)
        self.record: list[dict] = []
        self.jpeg = noisy  # noise compresses badly as PNG; synthetic.py makes some others JPEG too

    def colour(self, name: str) -> tuple[int, ...]:
        return _jitter(self.rng, COLOURS[name], VARIED_TINT)

    def ink(self) -> tuple[int, ...]:
        """Dark grey, or a dark colour."""
        if self.rng.random() < 0.6:
            v = self.rng.randint(0, 70)
            return (v, v, v)
        return tuple(self.rng.randint(0, 90) for _ in range(3))

    def place(self, k: int, capacity: int, fill: tuple[float, float]) -> tuple[list[tuple[float, float]], float]:
        """k centres anywhere, at least 2.3 radii apart, and their common radius: at most what a
        `capacity`-cell grid would give, scaled by `fill` and a free factor (smaller if they do not fit)."""
        rng, w, h = self.rng, self.w, self.h
        cols, rows = _grid(w, h, max(capacity, k))
        r = rng.uniform(*fill) * rng.uniform(0.6, 1.0) * 0.46 * min(w / cols, h / rows)
        while True:
            centres: list[tuple[float, float]] = []
            for _ in range(300):
                c = (rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1))
                if all(math.dist(c, o) > 2.3 * r for o in centres):
                    centres.append(c)
                    if len(centres) == k:
                        return centres, r
            r *= 0.9

    def shape(self, kind: str, cx: float, cy: float, r: float, rgb, name: str) -> None:
        rng, s = self.rng, self.scale
        turn = 0.0 if kind == "circle" else math.radians(rng.uniform(-12, 12))
        outline = None
        if rng.random() < 0.25:
            outline = tuple(int(v * 0.5) for v in rgb) if rng.random() < 0.7 else (20, 20, 20)
        polys = shape_polygons(kind, cx * s, cy * s, r * s, square=rng.uniform(0.74, 0.9),
                              arm=rng.uniform(0.28, 0.4), turn=turn)
        width = max(1, round(r * s * rng.uniform(0.05, 0.1))) if outline else 0
        for poly in polys:
            self.draw.polygon(poly, fill=rgb, outline=outline, width=width)
        self.record.append({"shape": kind, "colour": name, "centre": [round(cx, 1), round(cy, 1)], "radius": round(r, 1)})

    def _font(self, height: float, bold: bool = False) -> tuple[ImageFont.FreeTypeFont, str]:
        faces = [f for f in VARIED_FONTS if "Bold" in f] if bold else VARIED_FONTS
        face = self.rng.choice(faces)
        return _face(face, max(6, round(height * self.scale / 0.73))), face

    def big_text(self, text: str, rgb) -> Box:
        """``text`` large anywhere it fits (0.3-0.8 of the short side tall); its box."""
        rng, s = self.rng, self.scale
        font, face = self._font(rng.uniform(0.3, 0.8) * min(self.w, self.h))
        stroke = max(1, font.size // 30) if rng.random() < 0.2 else 0
        for _ in range(12):
            l, t, r, b = self.draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
            fit = min(0.92 * self.w * s / (r - l), 0.88 * self.h * s / (b - t))
            if fit >= 1:
                break
            font = _face(face, max(6, int(font.size * fit * 0.97)))
        l, t, r, b = self.draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        x = rng.uniform(0, max(0, self.w * s - (r - l))) - l
        y = rng.uniform(0, max(0, self.h * s - (b - t))) - t
        self.draw.text((x, y), text, font=font, fill=rgb, stroke_width=stroke, stroke_fill=rgb)
        return self._note_text(text, ((x + l) / s, (y + t) / s, (x + r) / s, (y + b) / s), face)

    def label(self, text: str, cx: float, cy: float, height: float, rgb, bold: bool = False) -> Box:
        s = self.scale
        font, face = self._font(height, bold)
        l, t, r, b = self.draw.textbbox((0, 0), text, font=font)
        x, y = cx * s - (l + r) / 2, cy * s - (t + b) / 2
        self.draw.text((x, y), text, font=font, fill=rgb)
        return self._note_text(text, ((x + l) / s, (y + t) / s, (x + r) / s, (y + b) / s), face)

    def rect(self, box: Box, rgb, outline=None, width: float = 1) -> None:
        s = self.scale
        self.draw.rectangle([v * s for v in box], fill=rgb, outline=outline, width=max(1, round(width * s)) if outline else 0)

    def ellipse(self, box: Box, rgb, outline=None, width: float = 1) -> None:
        s = self.scale
        self.draw.ellipse([v * s for v in box], fill=rgb, outline=outline, width=max(1, round(width * s)) if outline else 0)

    def line(self, points: list[tuple[float, float]], rgb, width: float) -> None:
        s = self.scale
        self.draw.line([(x * s, y * s) for x, y in points], fill=rgb, width=max(1, round(width * s)), joint="curve")

    def finish(self) -> Image.Image:
        if self.scale == 1:
            return self.image
        resample = self.rng.choice((Image.LANCZOS, Image.BICUBIC, Image.BILINEAR, Image.BOX))
        image = self.image.resize((self.w, self.h), resample)
        if self.rng.random() < 0.1:
            image = image.filter(ImageFilter.GaussianBlur(self.rng.uniform(0.3, 0.8)))
        return image

    def _note_text(self, text: str, box: Box, face: str) -> Box:
        self.record.append({"text": text, "box": [round(v, 1) for v in box], "font": face})
        return box


Painter = PlainPainter | VariedPainter
LOOKS: dict[str, type[PlainPainter] | type[VariedPainter]] = {"plain": PlainPainter, "varied": VariedPainter}
