"""A synthetic multi-domain visual-question dataset and an exact-match evaluator.

Built for training and evaluating tiny SPHINX models on a CPU: every question has a short answer
(a word, a number, a letter or two words), the answer cannot be guessed from the question alone
beyond chance, and the content stays legible once the image's longer side is resized to 256 px.

What is drawn is here; how it is drawn is a look (painters.py): ``plain`` is SPHINX-Nano 1's data,
byte for byte (the first five domains); ``varied`` is Nano 2's (all nine domains, rendering varied on
purpose, question paraphrases, a drawing record per image).

Domains (balanced with the aspect ratios in shuffled blocks; the first question of a record is
the domain's own, and training records may ask every other fact of the scene after it):

* ``colour``   -- 1-3 shapes of distinct kinds and colours: "What colour is the {shape}?"
* ``count``    -- 1-6 identical shapes: "How many {shape}s are there?" -> "1".."6"
* ``shape``    -- one shape: "What shape is shown?" -> circle / square / triangle / cross
* ``text``     -- a 1-3 digit number: "What number is written in the image?"
* ``position`` -- two shapes far apart along the long axis:
  "Which side is the {colour} {shape} on?" -> left / right (wide and square images) or
  top / bottom (tall images)
* ``words``    -- one or two words of WORDS in any case: "What does the text say?" (OCR beyond digits)
* ``chart``    -- 3-5 bars (or points on a line) labelled A-E with their values 1-9 written on them:
  "Which bar has the largest value?" -> "B", "What is the value of bar C?" -> "7"
* ``table``    -- 2-3 rows under a header of 2-3 of TABLE_COLUMNS: "What is in row 2, column price?"
* ``marks``    -- Set-of-Mark: 2-4 shapes, each with a numbered mark: "What shape is marked 3?"

Extra questions (``extra_questions=True``) ask every other fact of the scene the record's image
answers (the colour of a count image's shapes, the count of a shape image, every cell of a table).
They multiply the supervision per encoded image: Nano's encoders learn from scratch, and one
question per image starves them.

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
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from sphinx_edge.train.painters import ASPECTS, COLOURS, LOOKS, SHAPES, Painter, aspect_ratio

DOMAINS: tuple[str, ...] = ("colour", "count", "shape", "text", "position", "words", "chart", "table", "marks")
NANO1_DOMAINS: tuple[str, ...] = DOMAINS[:5]  # what SPHINX-Nano 1 learned: the plain look's default
LOOK_DOMAINS: dict[str, tuple[str, ...]] = {"plain": NANO1_DOMAINS, "varied": DOMAINS}
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "cross": "crosses"}
MAX_COUNT = 6
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "cake", "milk",
                          "door", "rain", "snow", "leaf", "ship", "lamp", "rose", "frog", "hat", "cup", "key",
                          "box", "bus", "car", "pen", "map", "egg", "owl", "bee", "ant", "cow")
CHART_LABELS = "ABCDE"
TABLE_COLUMNS: tuple[str, ...] = ("price", "size", "age", "score", "weight", "count")

# Question templates: the first of each is the canonical wording (plain look, independent renderer);
# the varied look picks any of them.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?", "What color is the {shape}?",
               "Which colour does the {shape} have?"),
    "count": ("How many {shapes} are there?", "How many {shapes} can you see?", "What is the number of {shapes}?",
              "Count the {shapes}."),
    "shape": ("What shape is shown?", "Which shape is in the picture?", "What is the shape in the image?"),
    "text": ("What number is written in the image?", "Which number is shown?", "What number do you see?",
             "Read the number."),
    "position": ("Which side is the {colour} {shape} on?", "On which side is the {colour} {shape}?",
                 "Where is the {colour} {shape}: which side?"),
    "digits": ("How many digits does the number have?",),
    "first_digit": ("What is the first digit of the number?",),
    "which_shape": ("Which shape is {colour}?", "What shape is {colour}?"),
    "words": ("What does the text say?", "What is written in the image?", "Read the text.",
              "Which words are written here?"),
    "word_count": ("How many words are written?",),
    "letters": ("How many letters does the word have?",),
    "first_letter": ("What is the first letter of the word?",),
    "chart_max": ("Which {item} has the largest value?", "Which {item} is the largest?",
                  "Which {item} shows the biggest value?"),
    "chart_min": ("Which {item} has the smallest value?", "Which {item} is the smallest?"),
    "chart_value": ("What is the value of {item} {label}?", "Which value does {item} {label} have?"),
    "chart_count": ("How many {items} are there?",),
    "chart_colour": ("What colour is the {item} with the largest value?",),
    "chart_trend": ("Does the line end higher or lower than it starts?",),
    "table_cell": ("What is in row {row}, column {column}?", "What is the {column} in row {row}?",
                   "Which value is in row {row} under {column}?"),
    "table_rows": ("How many rows does the table have?",),
    "marks_shape": ("What shape is marked {mark}?", "Which shape has the mark {mark}?",
                    "What is the shape labelled {mark}?"),
    "marks_colour": ("What colour is the shape marked {mark}?", "What is the colour of the shape marked {mark}?"),
    "marks_number": ("Which number marks the {colour} {shape}?",),
}
QUESTIONS: dict[str, str] = {d: TEMPLATES[d][0] for d in NANO1_DOMAINS}
EXTRA_QUESTIONS: dict[str, str] = {k: TEMPLATES[k][0] for k in ("digits", "first_digit")}
IMAGE_TOKEN = "<image>"
JPEG_SHARE = 0.25  # varied look: JPEG re-encoded images besides the noisy ones (always JPEG)
JPEG_QUALITY = (55, 92)

Ask = tuple[str, dict, str]  # (template key, its fields, answer)
QA = list[tuple[str, str]]  # (question, answer) pairs about one image, the domain's own first


# What each template field can be: parse_question reads a question back into (template key, fields).
FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "shapes": tuple(PLURALS.values()), "colour": tuple(COLOURS), "item": ("bar", "point"),
    "items": ("bars", "points"), "label": tuple(CHART_LABELS), "mark": tuple("1234"), "row": tuple("123"),
    "column": TABLE_COLUMNS,
}


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{'|'.join(map(re.escape, FIELD_VALUES[p]))})"
                              for i, p in enumerate(parts)))


_PATTERNS = [(key, _template_pattern(t)) for key, templates in TEMPLATES.items() for t in templates]


def parse_question(question: str) -> tuple[str, dict[str, str]] | None:
    """(template key, fields) of a question in any of its wordings, or None for one no template asks."""
    for key, pattern in _PATTERNS:
        if m := pattern.fullmatch(question.strip()):
            return key, m.groupdict()
    return None


def canonical_question(question: str) -> str:
    """The canonical wording of a paraphrased question (itself if no template asks it): what the warm-up's
    classifier keys its per-question queries by, so that paraphrases share them."""
    parsed = parse_question(question)
    return question if parsed is None else TEMPLATES[parsed[0]][0].format(**parsed[1])


def nearest_aspect(width: int, height: int) -> str:
    """The entry of ASPECTS closest (in log ratio) to a width x height image."""
    r = math.log(width / height)
    return min(ASPECTS, key=lambda a: abs(math.log(aspect_ratio(a)) - r))


def is_padded_aspect(aspect: str) -> bool:
    """True for aspect ratios >= 2:1 or <= 1:2: with the longer side resized to the 2x2 grid's
    canvas and the image placed top-left, at least one tile is pure padding."""
    r = aspect_ratio(aspect)
    return r >= 2.0 - 1e-9 or r <= 0.5 + 1e-9


# --------------------------------------------------------------------------- domains: Nano 1's five
# (the plain look draws exactly what Nano 1 was trained on: keep these functions' draws of `rng` in order)


def _sample_colour(rng: random.Random, p: Painter) -> list[Ask]:
    k = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, k)
    colours = rng.sample(list(COLOURS), k)
    centres, r = p.place(k, 4, (0.65, 0.95))
    for kind, colour, (cx, cy) in zip(kinds, colours, centres):
        p.shape(kind, cx, cy, r, p.colour(colour), colour)
    i = rng.randrange(k)
    order = [i] + [j for j in range(k) if j != i]
    asks = [("colour", {"shape": kinds[j]}, colours[j]) for j in order]
    if p.name == "varied":  # binding both ways
        asks += [("which_shape", {"colour": colours[j]}, kinds[j]) for j in order]
    return asks


def _sample_count(rng: random.Random, p: Painter) -> list[Ask]:
    n = rng.randint(1, MAX_COUNT)
    kind = rng.choice(SHAPES)
    name = rng.choice(list(COLOURS))
    colour = p.colour(name)
    # A fixed capacity (not n-dependent) so that shape size says nothing about the count.
    centres, r = p.place(n, MAX_COUNT, (0.72, 0.95))
    for cx, cy in centres:
        p.shape(kind, cx, cy, r, colour, name)
    return [("count", {"shapes": PLURALS[kind]}, str(n)), ("shape", {}, kind), ("colour", {"shape": kind}, name)]


def _sample_shape(rng: random.Random, p: Painter) -> list[Ask]:
    kind = rng.choice(SHAPES)
    name = rng.choice(list(COLOURS))
    colour = p.colour(name)
    centres, r = p.place(1, 1, (0.55, 0.95))
    cx, cy = centres[0]
    p.shape(kind, cx, cy, r, colour, name)
    return [("shape", {}, kind), ("colour", {"shape": kind}, name), ("count", {"shapes": PLURALS[kind]}, "1")]


def _sample_text(rng: random.Random, p: Painter) -> list[Ask]:
    digits = rng.randint(1, 3)
    number = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    p.big_text(str(number), p.ink())
    text = str(number)
    return [("text", {}, text), ("digits", {}, str(len(text))), ("first_digit", {}, text[0])]


def _sample_position(rng: random.Random, p: Painter) -> list[Ask]:
    w, h = p.w, p.h
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
        p.shape(kind, cx, cy, r, p.colour(colour), colour)
    i = rng.randrange(2)
    sides = ("top", "bottom") if tall else ("left", "right")
    asks = [("position", {"colour": colours[j], "shape": kinds[j]}, sides[j]) for j in (i, 1 - i)]
    if kinds[0] != kinds[1]:
        asks += [("colour", {"shape": kinds[j]}, colours[j]) for j in (0, 1)]
    return asks


# --------------------------------------------------------------------------- domains: SPHINX-X's mix in miniature


def _sample_words(rng: random.Random, p: Painter) -> list[Ask]:
    n = 1 if rng.random() < 0.7 else 2
    phrase = " ".join(rng.sample(WORDS, n))
    shown = rng.choice((phrase, phrase, phrase.title(), phrase.upper()))
    p.big_text(shown, p.ink())
    asks = [("words", {}, phrase), ("word_count", {}, str(n))]
    if n == 1:
        asks += [("letters", {}, str(len(phrase))), ("first_letter", {}, phrase[0])]
    return asks


def _sample_chart(rng: random.Random, p: Painter) -> list[Ask]:
    """Bars (points on a line, in wide images, 30 %) with letters under them and values on them.
    Tall images get horizontal bars, letters on the left."""
    w, h = p.w, p.h
    n = rng.randint(3, 5)
    values = rng.sample(range(1, 10), n)  # distinct: one largest, one smallest
    labels = CHART_LABELS[:n]
    horizontal = h > 1.2 * w
    item = "point" if not horizontal and rng.random() < 0.3 else "bar"
    names = [rng.choice(list(COLOURS))] * n if rng.random() < 0.5 else rng.sample(list(COLOURS), n)
    fills = [p.colour(c) for c in names]
    ink = p.ink()
    long_, short = (h, w) if horizontal else (w, h)
    slot = 0.9 * long_ / n
    text_h = min(0.085 * short, 0.45 * slot) * rng.uniform(0.8, 1.0)
    lw = max(1.0, 0.006 * max(w, h))
    start = 0.05 * long_  # the first slot's start along the category axis
    base = (0.06 * w + 1.8 * text_h) if horizontal else (h - 0.05 * h - 1.6 * text_h)  # the value axis' zero
    end = (w - 0.04 * w - 2.6 * text_h) if horizontal else (0.05 * h + 1.7 * text_h)  # where 9 would reach
    grid = rng.random() < 0.3
    for v in (3, 6, 9) if grid else ():
        at = base + (end - base) * v / 9
        p.line([(at, start), (at, start + n * slot)] if horizontal else [(start, at), (start + n * slot, at)],
               (205, 205, 205), lw)
    p.line([(base, start), (base, start + n * slot)] if horizontal else [(start, base), (start + n * slot, base)], ink, lw)
    mids, tips = [], []
    for i, (v, label, fill) in enumerate(zip(values, labels, fills)):
        mid = start + slot * (i + 0.5)
        tip = base + (end - base) * v / 9
        mids.append(mid)
        tips.append(tip)
        half = slot * rng.uniform(0.25, 0.35)
        if item == "bar":
            p.rect((min(base, tip), mid - half, max(base, tip), mid + half) if horizontal else
                   (mid - half, min(base, tip), mid + half, max(base, tip)), fill)
        if horizontal:
            p.label(label, base - 1.0 * text_h, mid, text_h, ink)
            p.label(str(v), tip + 0.9 * text_h, mid, text_h, ink)
        else:
            p.label(label, mid, base + 0.95 * text_h, text_h, ink)
            p.label(str(v), mid, tip - 0.95 * text_h, text_h, ink)
        p.record.append({"item": item, "label": label, "value": v, "colour": names[i], "at": round(mid, 1),
                         "base": round(base, 1), "tip": round(tip, 1), "horizontal": horizontal})
    if item == "point":
        p.line(list(zip(mids, tips)), ink, lw * 1.5)
        m = min(0.3 * slot, 0.05 * short)
        for x, y, fill in zip(mids, tips, fills):
            p.ellipse((x - m, y - m, x + m, y + m), fill)
    top, low = labels[values.index(max(values))], labels[values.index(min(values))]
    j = rng.randrange(n)
    own = rng.choice((("chart_max", {"item": item}, top), ("chart_min", {"item": item}, low),
                      ("chart_value", {"item": item, "label": labels[j]}, str(values[j]))))
    asks = [own, ("chart_max", {"item": item}, top), ("chart_min", {"item": item}, low),
            ("chart_count", {"items": item + "s"}, str(n))]
    asks += [("chart_value", {"item": item, "label": lb}, str(v)) for lb, v in zip(labels, values)]
    if len(set(names)) == n:
        asks.append(("chart_colour", {"item": item}, names[values.index(max(values))]))
    if item == "point":
        asks.append(("chart_trend", {}, "higher" if values[-1] > values[0] else "lower"))
    return [own] + [a for a in asks[1:] if a != own]


def _sample_table(rng: random.Random, p: Painter) -> list[Ask]:
    """A header row of column names over 2-3 rows of numbers; grid lines, rules or zebra stripes."""
    w, h = p.w, p.h
    ncols = rng.randint(2, 3) if w >= 0.8 * h else 2
    nrows = rng.randint(2, 3)
    columns = rng.sample(TABLE_COLUMNS, ncols)
    values = [[rng.randint(1, 99) for _ in columns] for _ in range(nrows)]
    cell_h = min(0.92 * h / (nrows + 1), 0.92 * w / (ncols * 2.4)) * rng.uniform(0.85, 1.0)
    cell_w = min(cell_h * rng.uniform(2.2, 2.8), 0.95 * w / ncols)
    tw, th = cell_w * ncols, cell_h * (nrows + 1)
    x0, y0 = rng.uniform(0, w - tw), rng.uniform(0, h - th)
    ink = p.ink()
    style = rng.choice(("grid", "rules", "zebra"))
    lw = max(1.0, 0.004 * max(w, h))
    if style == "zebra":
        shade = tuple(max(0, v - 30) for v in (235, 235, 240))
        for r in range(0, nrows + 1, 2):
            p.rect((x0, y0 + r * cell_h, x0 + tw, y0 + (r + 1) * cell_h), shade)
    text_h = min(0.45 * cell_h, 0.17 * cell_w) * rng.uniform(0.85, 1.0)
    for c, name in enumerate(columns):
        p.label(name, x0 + (c + 0.5) * cell_w, y0 + 0.5 * cell_h, text_h, ink, bold=True)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            p.label(str(v), x0 + (c + 0.5) * cell_w, y0 + (r + 1.5) * cell_h, text_h, ink)
    if style == "grid":
        for r in range(nrows + 2):
            p.line([(x0, y0 + r * cell_h), (x0 + tw, y0 + r * cell_h)], ink, lw)
        for c in range(ncols + 1):
            p.line([(x0 + c * cell_w, y0), (x0 + c * cell_w, y0 + th)], ink, lw)
    elif style == "rules":
        for y in (y0, y0 + cell_h, y0 + th):
            p.line([(x0, y), (x0 + tw, y)], ink, lw)
    p.record.append({"table": [list(columns)] + values, "box": [round(v, 1) for v in (x0, y0, x0 + tw, y0 + th)]})
    cells = [(r, c) for r in range(nrows) for c in range(ncols)]
    rng.shuffle(cells)
    asks = [("table_cell", {"row": r + 1, "column": columns[c]}, str(values[r][c])) for r, c in cells]
    return asks + [("table_rows", {}, str(nrows))]


def _sample_marks(rng: random.Random, p: Painter) -> list[Ask]:
    """2-4 shapes, each with a numbered mark (a disc or box with a digit) on its upper left corner."""
    k = rng.randint(2, 4)
    kinds = [rng.choice(SHAPES) for _ in range(k)]
    colours = rng.sample(list(COLOURS), k)
    centres, r = p.place(k, 4, (0.55, 0.8))
    marks = rng.sample(range(1, k + 1), k)
    for kind, colour, (cx, cy) in zip(kinds, colours, centres):
        p.shape(kind, cx, cy, r, p.colour(colour), colour)
    boxed, dark = rng.random() < 0.4, rng.random() < 0.3
    m = max(0.4 * r, 0.035 * max(p.w, p.h))
    back, fore = ((25, 25, 25), (250, 250, 250)) if dark else ((252, 252, 252), (20, 20, 20))
    for mark, (cx, cy) in zip(marks, centres):
        mx = min(p.w - m - 1, max(m + 1, cx - 0.8 * r))
        my = min(p.h - m - 1, max(m + 1, cy - 0.8 * r))
        (p.rect if boxed else p.ellipse)((mx - m, my - m, mx + m, my + m), back, outline=(20, 20, 20), width=0.12 * m)
        p.label(str(mark), mx, my, 1.05 * m, fore)
        p.record.append({"mark": mark, "centre": [round(mx, 1), round(my, 1)], "radius": round(m, 1),
                         "on": [round(cx, 1), round(cy, 1)]})
    j = rng.randrange(k)
    own = rng.choice((("marks_shape", {"mark": marks[j]}, kinds[j]), ("marks_colour", {"mark": marks[j]}, colours[j])))
    asks = [own]
    for i in range(k):
        asks += [("marks_shape", {"mark": marks[i]}, kinds[i]), ("marks_colour", {"mark": marks[i]}, colours[i]),
                 ("marks_number", {"colour": colours[i], "shape": kinds[i]}, str(marks[i]))]
    return [own] + [a for a in asks[1:] if a != own]


_DOMAIN_FNS: dict[str, Callable[[random.Random, Painter], list[Ask]]] = {
    "colour": _sample_colour,
    "count": _sample_count,
    "shape": _sample_shape,
    "text": _sample_text,
    "position": _sample_position,
    "words": _sample_words,
    "chart": _sample_chart,
    "table": _sample_table,
    "marks": _sample_marks,
}
assert tuple(_DOMAIN_FNS) == DOMAINS

# The answers to each domain's own (first) question.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "count": tuple(str(i) for i in range(1, MAX_COUNT + 1)),
    "shape": SHAPES,
    "text": tuple(str(i) for i in range(1000)),
    "position": ("left", "right", "top", "bottom"),
    "words": WORDS + tuple(f"{a} {b}" for a in WORDS for b in WORDS if a != b),
    "chart": tuple(CHART_LABELS) + tuple(str(i) for i in range(1, 10)),
    "table": tuple(str(i) for i in range(1, 100)),
    "marks": SHAPES + tuple(COLOURS),
}


# --------------------------------------------------------------------------- generation


def seeded_rng(salt: str, *parts) -> random.Random:
    """A generator seeded by a hash of `salt` and `parts`: each sample its own, whoever draws it."""
    digest = hashlib.sha256("/".join(map(str, (salt, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _rng(*parts) -> random.Random:
    return seeded_rng("sphinx-edge-synthetic", *parts)


def _plan(n: int, seed: int, split: str, domains: Sequence[str]) -> list[tuple[str, str]]:
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


def _painter(look: str) -> type[Painter]:
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}: choose from {', '.join(LOOKS)}")
    return LOOKS[look]


def make_sample(domain: str, aspect: str, rng: random.Random, look: str = "plain",
                phrasing: random.Random | None = None) -> tuple[Image.Image, QA, Painter]:
    """One image for a domain and aspect, drawn with ``rng`` in a look, every (question, answer) it
    supports (the domain's own question first), and the painter (its ``record`` says what was drawn).
    Questions take their canonical wording, or with ``phrasing`` a paraphrase drawn from it."""
    painter = _painter(look)(rng, aspect)
    asks = _DOMAIN_FNS[domain](rng, painter)
    qa = [((phrasing.choice(TEMPLATES[key]) if phrasing else TEMPLATES[key][0]).format(**fields), answer)
          for key, fields, answer in asks]
    return painter.finish(), qa, painter


def _write_sample(job: tuple) -> dict:
    """Draws sample i (its own rng: the result does not depend on which process draws it), saves its
    image and returns its record."""
    out_dir, seed, split, i, domain, aspect, extra_questions, look = job
    varied = look != "plain"
    img, qa, painter = make_sample(domain, aspect, _rng(seed, split, i), look,
                                   _rng(seed, split, i, "phrasing") if varied else None)
    jpeg = varied and (painter.jpeg or _rng(seed, split, i, "jpeg").random() < JPEG_SHARE)
    name = f"images/{split}_{i:06d}.{'jpg' if jpeg else 'png'}"
    if jpeg:
        img.save(out_dir / name, format="JPEG", quality=_rng(seed, split, i, "quality").randint(*JPEG_QUALITY))
    else:
        img.save(out_dir / name, format="PNG")
    if not extra_questions:
        qa = qa[:1]
    conversations = []
    for turn, (question, answer) in enumerate(qa):
        prefix = f"{IMAGE_TOKEN}\n" if turn == 0 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    record = {"id": f"{split}_{i:06d}", "image": name, "domain": domain, "aspect": aspect,
              "conversations": conversations}
    if varied:  # (Nano 1's records stay as they were)
        record |= {"look": look, "size": list(img.size), "drawn": painter.record}
    return record


def generate(out_dir: Path, n: int, *, seed: int, split: str = "train", extra_questions: bool = False,
             workers: int = 1, domains: Sequence[str] | None = None, look: str = "plain") -> Path:
    """Write ``n`` samples to ``out_dir/images/{split}_{i:06d}.png|.jpg`` and ``out_dir/{split}.json``.

    The json is a LLaVA conversation list; each record also carries ``domain`` and ``aspect``
    (``"w:h"``, the planned one; the varied look spreads the drawn ratio around it and records
    ``size`` and ``drawn``). With ``extra_questions`` a record's conversation goes on, after its
    domain's own question, with every other question its image answers (the images are the same
    either way). Deterministic: the same (seed, split, n, extra_questions, look) gives the same bytes,
    with any number of worker processes. ``domains`` limits the set to some domains (default: the
    look's, LOOK_DOMAINS). Returns the json path."""
    _painter(look)  # refused before anything is written
    out_dir = Path(out_dir)
    plan = _plan(n, seed, split, LOOK_DOMAINS[look] if domains is None else domains)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, split, i, domain, aspect, extra_questions, look) for i, (domain, aspect) in enumerate(plan)]
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

    Returns ``{"accuracy", "n", "per_domain", "per_aspect", "padded_tiles", "n_padded",
    "colour_by_shapes", "mistakes"}``; ``padded_tiles`` is the accuracy over samples with aspect >= 2:1 or <= 1:2
    (None if none); ``colour_by_shapes`` the colour questions' accuracy by the number of shapes drawn
    (``{"1": ..., "2": ...}``, from records that keep their drawing; empty if none do); ``mistakes``
    every wrong answer as ``{"image", "question", "expected", "answer"}``, in the file's order.
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
    by_shapes: dict[int, list[bool]] = defaultdict(list)
    mistakes: list[dict[str, str]] = []
    for i, rec in enumerate(records):
        image_path = data_json.parent / rec["image"]
        question, expected = question_of(rec), answer_of(rec)
        pred = predict(image_path, question)
        ok = normalize_answer(pred) == normalize_answer(expected)
        hits.append(ok)
        if not ok:
            mistakes.append({"image": rec["image"], "question": question, "expected": expected, "answer": pred})
        per_domain[rec.get("domain", "unknown")].append(ok)
        aspect = _record_aspect(rec, image_path)
        per_aspect[aspect].append(ok)
        if is_padded_aspect(aspect):
            padded.append(ok)
        if rec.get("domain") == "colour" and "drawn" in rec:
            by_shapes[sum("shape" in d for d in rec["drawn"])].append(ok)
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
        "colour_by_shapes": {str(k): _acc(by_shapes[k]) for k in sorted(by_shapes)},
        "mistakes": mistakes,
    }
