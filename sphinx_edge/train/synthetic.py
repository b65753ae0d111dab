"""A synthetic multi-domain visual-question dataset and an exact-match evaluator.

Built for training and evaluating tiny SPHINX models on a CPU: every question has a single
lowercase word or number as its answer, the answer cannot be guessed from the question
alone beyond chance, and the visual content stays legible once the image's longer side is
resized to 256 px (shapes span a large fraction of the short side, digits are large and
dark on a light background).

Domains (balanced with the aspect ratios in shuffled blocks; the first question of a record is
the domain's own, and training records may ask every other fact of the scene after it):

* ``colour``   -- 1-3 shapes of distinct kinds and colours: "What colour is the {shape}?"
* ``count``    -- 1-6 identical shapes: "How many {shape}s are there?" -> "1".."6"
* ``shape``    -- one shape: "What shape is shown?" -> circle / square / triangle / cross
* ``text``     -- a 1-3 digit number: "What number is written in the image?"
* ``position`` -- two shapes far apart along the long axis:
  "Which side is the {colour} {shape} on?" -> left / right (wide and square images) or
  top / bottom (tall images)

Extra questions (``extra_questions=True``) reuse the templates above where the scene answers them
(the colour of a count image's shapes, the count of a shape image) and add two about numbers
(``EXTRA_QUESTIONS``). They multiply the supervision per encoded image: Nano's encoders learn
from scratch, and one question per image starves them.

Output is LLaVA conversation json (``{split}.json``) next to an ``images/`` folder. Only
pillow, numpy and the standard library are used (no torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DOMAINS: tuple[str, ...] = ("colour", "count", "shape", "text", "position")
# width:height
ASPECTS: tuple[str, ...] = ("1:1", "1:2", "1:3", "1:4", "2:1", "3:1", "4:1", "3:2", "2:3")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 185),
    "orange": (245, 135, 20),
}
COLOUR_JITTER = 10  # each channel of a drawn colour is within this of its palette value
LONG_SIDE = (160, 320)  # inclusive range of the image's longer side, pixels
MAX_COUNT = 6

QUESTIONS: dict[str, str] = {
    "colour": "What colour is the {shape}?",
    "count": "How many {shapes} are there?",
    "shape": "What shape is shown?",
    "text": "What number is written in the image?",
    "position": "Which side is the {colour} {shape} on?",
}
EXTRA_QUESTIONS: dict[str, str] = {
    "digits": "How many digits does the number have?",
    "first_digit": "What is the first digit of the number?",
}
IMAGE_TOKEN = "<image>"

QA = list[tuple[str, str]]  # (question, answer) pairs about one image, the domain's own first


# --------------------------------------------------------------------------- geometry


def aspect_ratio(aspect: str) -> float:
    """Width / height of an ``"w:h"`` aspect string."""
    w, h = aspect.split(":")
    return int(w) / int(h)


def is_padded_aspect(aspect: str) -> bool:
    """True for aspect ratios >= 2:1 or <= 1:2: with the longer side resized to the 2x2 grid's
    canvas and the image placed top-left, at least one tile is pure padding."""
    r = aspect_ratio(aspect)
    return r >= 2.0 - 1e-9 or r <= 0.5 + 1e-9


def image_size(aspect: str, long_side: int) -> tuple[int, int]:
    """(width, height) for an aspect with the given longer side."""
    r = aspect_ratio(aspect)
    if r >= 1:
        return long_side, max(1, round(long_side / r))
    return max(1, round(long_side * r)), long_side


def nearest_aspect(width: int, height: int) -> str:
    """The entry of ASPECTS closest (in log ratio) to a width x height image."""
    r = math.log(width / height)
    return min(ASPECTS, key=lambda a: abs(math.log(aspect_ratio(a)) - r))


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


# --------------------------------------------------------------------------- drawing


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _background(rng: random.Random) -> tuple[int, ...]:
    base = rng.randint(228, 248)
    return tuple(min(255, base + rng.randint(-6, 6)) for _ in range(3))


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
def _font(size: int):
    font = ImageFont.load_default(size=size)
    return font if isinstance(font, ImageFont.FreeTypeFont) else None


def _draw_number(rng: random.Random, img: Image.Image, text: str, fill) -> None:
    """Render ``text`` large (about half the short side tall) anywhere it fits."""
    w, h = img.size
    size = max(8, int(rng.uniform(0.55, 0.9) * min(w, h)))
    font = _font(size)
    if font is None:  # Pillow without FreeType: upscale the fixed bitmap font.
        _draw_number_bitmap(rng, img, text, fill)
        return
    for _ in range(8):
        l, t, r, b = font.getbbox(text)
        scale = min(0.9 * w / (r - l), 0.85 * h / (b - t))
        if scale >= 1:
            break
        size = max(8, int(size * scale))
        font = _font(size)
    l, t, r, b = font.getbbox(text)
    x = rng.uniform(0, max(0, w - (r - l)))
    y = rng.uniform(0, max(0, h - (b - t)))
    ImageDraw.Draw(img).text((round(x - l), round(y - t)), text, font=font, fill=fill)


def _draw_number_bitmap(rng: random.Random, img: Image.Image, text: str, fill) -> None:
    font = ImageFont.load_default()
    l, t, r, b = font.getbbox(text)
    mask = Image.new("L", (r - l, b - t), 0)
    ImageDraw.Draw(mask).text((-l, -t), text, font=font, fill=255)
    w, h = img.size
    scale = min(0.9 * w / mask.width, 0.85 * h / mask.height) * rng.uniform(0.7, 1.0)
    mask = mask.resize((max(1, int(mask.width * scale)), max(1, int(mask.height * scale))), Image.NEAREST)
    x = rng.randint(0, max(0, w - mask.width))
    y = rng.randint(0, max(0, h - mask.height))
    img.paste(Image.new("RGB", mask.size, fill), (x, y), mask)


# --------------------------------------------------------------------------- domains


def _sample_colour(rng, img, draw):
    w, h = img.size
    k = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, k)
    colours = rng.sample(list(COLOURS), k)
    centres, r = _cells(rng, w, h, k, capacity=4, fill=(0.65, 0.95))
    for kind, colour, (cx, cy) in zip(kinds, colours, centres):
        draw_shape(draw, kind, cx, cy, r, _jitter(rng, COLOURS[colour], COLOUR_JITTER))
    i = rng.randrange(k)
    order = [i] + [j for j in range(k) if j != i]
    return [(QUESTIONS["colour"].format(shape=kinds[j]), colours[j]) for j in order]


def _sample_count(rng, img, draw):
    w, h = img.size
    n = rng.randint(1, MAX_COUNT)
    kind = rng.choice(SHAPES)
    name = rng.choice(list(COLOURS))
    colour = _jitter(rng, COLOURS[name], COLOUR_JITTER)
    # A fixed capacity (not n-dependent) so that shape size says nothing about the count.
    centres, r = _cells(rng, w, h, n, capacity=MAX_COUNT, fill=(0.72, 0.95))
    for cx, cy in centres:
        draw_shape(draw, kind, cx, cy, r, colour)
    return [(QUESTIONS["count"].format(shapes=PLURALS[kind]), str(n)),
            (QUESTIONS["shape"], kind),
            (QUESTIONS["colour"].format(shape=kind), name)]


def _sample_shape(rng, img, draw):
    w, h = img.size
    kind = rng.choice(SHAPES)
    name = rng.choice(list(COLOURS))
    colour = _jitter(rng, COLOURS[name], COLOUR_JITTER)
    centres, r = _cells(rng, w, h, 1, capacity=1, fill=(0.55, 0.95))
    cx, cy = centres[0]
    draw_shape(draw, kind, cx, cy, r, colour)
    return [(QUESTIONS["shape"], kind),
            (QUESTIONS["colour"].format(shape=kind), name),
            (QUESTIONS["count"].format(shapes=PLURALS[kind]), "1")]


def _sample_text(rng, img, draw):
    digits = rng.randint(1, 3)
    number = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    fill = tuple(rng.randint(0, 60) for _ in range(3))
    _draw_number(rng, img, str(number), fill)
    text = str(number)
    return [(QUESTIONS["text"], text),
            (EXTRA_QUESTIONS["digits"], str(len(text))),
            (EXTRA_QUESTIONS["first_digit"], text[0])]


def _sample_position(rng, img, draw):
    w, h = img.size
    tall = h > w
    long_, short = (h, w) if tall else (w, h)
    r = min(rng.uniform(0.10, 0.16) * long_, rng.uniform(0.3, 0.42) * short)
    gap = 0.02 * long_
    kinds = [rng.choice(SHAPES), rng.choice(SHAPES)]
    colours = rng.sample(list(COLOURS), 2)
    # Shape 0 wholly in the first half of the long axis, shape 1 wholly in the second half.
    along = [rng.uniform(r + 1, long_ / 2 - r - gap), rng.uniform(long_ / 2 + r + gap, long_ - r - 1)]
    for kind, colour, a in zip(kinds, colours, along):
        b = rng.uniform(r + 1, short - r - 1)
        cx, cy = (b, a) if tall else (a, b)
        draw_shape(draw, kind, cx, cy, r, _jitter(rng, COLOURS[colour], COLOUR_JITTER))
    i = rng.randrange(2)
    sides = ("top", "bottom") if tall else ("left", "right")
    qa = [(QUESTIONS["position"].format(colour=colours[j], shape=kinds[j]), sides[j]) for j in (i, 1 - i)]
    if kinds[0] != kinds[1]:
        qa += [(QUESTIONS["colour"].format(shape=kinds[j]), colours[j]) for j in (0, 1)]
    return qa


_DOMAIN_FNS = {
    "colour": _sample_colour,
    "count": _sample_count,
    "shape": _sample_shape,
    "text": _sample_text,
    "position": _sample_position,
}

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "count": tuple(str(i) for i in range(1, MAX_COUNT + 1)),
    "shape": SHAPES,
    "text": tuple(str(i) for i in range(1000)),
    "position": ("left", "right", "top", "bottom"),
}


# --------------------------------------------------------------------------- generation


def seeded_rng(salt: str, *parts) -> random.Random:
    """A generator seeded by a hash of `salt` and `parts`: each sample its own, whoever draws it."""
    digest = hashlib.sha256("/".join(map(str, (salt, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _rng(*parts) -> random.Random:
    return seeded_rng("sphinx-edge-synthetic", *parts)


def _plan(n: int, seed: int, split: str, domains: Sequence[str] = DOMAINS) -> list[tuple[str, str]]:
    """(domain, aspect) per sample: shuffled blocks of every combination, so both are balanced."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown or not domains:
        raise ValueError(f"unknown domains {unknown}: choose from {', '.join(DOMAINS)}")
    rng = _rng(seed, split, "plan")
    combos = [(d, a) for d in DOMAINS if d in domains for a in ASPECTS]
    plan: list[tuple[str, str]] = []
    while len(plan) < n:
        block = combos[:]
        rng.shuffle(block)
        plan.extend(block)
    return plan[:n]


def make_sample(domain: str, aspect: str, rng: random.Random) -> tuple[Image.Image, QA]:
    """One image for a domain and aspect, drawn with ``rng``, and every (question, answer) it
    supports, the domain's own question first."""
    w, h = image_size(aspect, rng.randint(*LONG_SIDE))
    img = Image.new("RGB", (w, h), _background(rng))
    qa = _DOMAIN_FNS[domain](rng, img, ImageDraw.Draw(img))
    return img, qa


def _write_sample(job: tuple) -> dict:
    """Draws sample i (its own rng: the result does not depend on which process draws it), saves its
    image and returns its record."""
    out_dir, seed, split, i, domain, aspect, extra_questions = job
    img, qa = make_sample(domain, aspect, _rng(seed, split, i))
    name = f"images/{split}_{i:06d}.png"
    img.save(out_dir / name, format="PNG")
    if not extra_questions:
        qa = qa[:1]
    conversations = []
    for turn, (question, answer) in enumerate(qa):
        prefix = f"{IMAGE_TOKEN}\n" if turn == 0 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return {"id": f"{split}_{i:06d}", "image": name, "domain": domain, "aspect": aspect,
            "conversations": conversations}


def generate(out_dir: Path, n: int, *, seed: int, split: str = "train", extra_questions: bool = False,
             workers: int = 1, domains: Sequence[str] = DOMAINS) -> Path:
    """Write ``n`` samples to ``out_dir/images/{split}_{i:06d}.png`` and ``out_dir/{split}.json``.

    The json is a LLaVA conversation list; each record also carries ``domain`` and ``aspect``
    (``"w:h"``). With ``extra_questions`` a record's conversation goes on, after its domain's own
    question, with every other question its image answers (the images are the same either way).
    Deterministic: the same (seed, split, n, extra_questions) gives the same bytes, with any number
    of worker processes. ``domains`` limits the set to some domains (a reading-only set, say).
    Returns the json path."""
    out_dir = Path(out_dir)
    plan = _plan(n, seed, split, domains)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, split, i, domain, aspect, extra_questions) for i, (domain, aspect) in enumerate(plan)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            records = pool.map(_write_sample, jobs, chunksize=64)
            pool.close()  # workers leave on their own, not by terminate()'s SIGTERM (see encoder_warmup)
            pool.join()
    else:
        records = [_write_sample(job) for job in jobs]
    path = out_dir / f"{split}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{split}.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- evaluation


def normalize_answer(s: str) -> str:
    """Lowercase, drop trailing '.'/'!' and surrounding whitespace, collapse inner whitespace."""
    s = " ".join(s.lower().split())
    return s.rstrip(".! ").strip()


def question_of(record: dict) -> str:
    """The human turn without the image placeholder."""
    q = record["conversations"][0]["value"]
    return q.replace(IMAGE_TOKEN, "", 1).strip()


def answer_of(record: dict) -> str:
    return record["conversations"][1]["value"]


def _record_aspect(record: dict, image_path: Path) -> str:
    aspect = record.get("aspect")
    if aspect:
        return aspect
    with Image.open(image_path) as im:
        return nearest_aspect(*im.size)


def _acc(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits)


def evaluate(
    predict: Callable[[Path, str], str],
    data_json: Path,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Exact-match accuracy of ``predict(image_path, question) -> answer`` on a LLaVA json.

    Returns ``{"accuracy", "n", "per_domain", "per_aspect", "padded_tiles", "n_padded"}``;
    ``padded_tiles`` is the accuracy over samples with aspect >= 2:1 or <= 1:2 (None if none).
    """
    data_json = Path(data_json)
    records = json.loads(data_json.read_text(encoding="utf-8"))
    if limit is not None:
        records = records[:limit]
    total = len(records)
    hits: list[bool] = []
    per_domain: dict[str, list[bool]] = defaultdict(list)
    per_aspect: dict[str, list[bool]] = defaultdict(list)
    padded: list[bool] = []
    for i, rec in enumerate(records):
        image_path = data_json.parent / rec["image"]
        pred = predict(image_path, question_of(rec))
        ok = normalize_answer(pred) == normalize_answer(answer_of(rec))
        hits.append(ok)
        per_domain[rec.get("domain", "unknown")].append(ok)
        aspect = _record_aspect(rec, image_path)
        per_aspect[aspect].append(ok)
        if is_padded_aspect(aspect):
            padded.append(ok)
        if progress is not None:
            progress(i + 1, total)
    order = {a: j for j, a in enumerate(ASPECTS)}
    return {
        "accuracy": _acc(hits) if hits else 0.0,
        "n": total,
        "per_domain": {d: _acc(per_domain[d]) for d in sorted(per_domain, key=lambda d: (
            DOMAINS.index(d) if d in DOMAINS else len(DOMAINS), d))},
        "per_aspect": {a: _acc(per_aspect[a]) for a in sorted(per_aspect, key=lambda a: (
            order.get(a, len(order)), a))},
        "padded_tiles": _acc(padded) if padded else None,
        "n_padded": len(padded),
    }
