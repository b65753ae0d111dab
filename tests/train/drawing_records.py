"""Reading a synthetic record's drawing: the answer to any question worked out from the record alone, and
checks that the record agrees with the pixels. Shared by the tests of both renderers (synthetic.py's varied
look and independent.py), which write records of the same form."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from sphinx_edge.train import synthetic as syn
from sphinx_edge.train.synthetic import COLOURS, PLURALS

def parse(question: str) -> tuple[str, dict]:
    parsed = syn.parse_question(question)
    assert parsed is not None, f"no template asks {question!r}"
    return parsed


def solve(rec: dict, key: str, f: dict) -> str:
    """The answer to a question, worked out from the drawing record alone."""
    drawn = rec["drawn"]
    shapes = [d for d in drawn if "shape" in d]
    texts = [d["text"] for d in drawn if "text" in d]
    items = [d for d in drawn if "item" in d]
    w, h = rec["size"]
    if key == "colour":
        (colour,) = {s["colour"] for s in shapes if s["shape"] == f["shape"]}
        return colour
    if key == "count":
        return str(sum(PLURALS[s["shape"]] == f["shapes"] for s in shapes))
    if key == "shape":
        (kind,) = {s["shape"] for s in shapes}
        return kind
    if key == "which_shape":
        (kind,) = [s["shape"] for s in shapes if s["colour"] == f["colour"]]
        return kind
    if key == "position":
        (s,) = [s for s in shapes if s["colour"] == f["colour"] and s["shape"] == f["shape"]]
        x, y = s["centre"]
        return ("top" if y < h / 2 else "bottom") if h > w else ("left" if x < w / 2 else "right")
    if key in ("text", "digits", "first_digit"):
        (text,) = texts
        return {"text": text, "digits": str(len(text)), "first_digit": text[0]}[key]
    if key in ("words", "word_count", "letters", "first_letter"):
        (text,) = texts
        text = text.lower()
        return {"words": text, "word_count": str(len(text.split())), "letters": str(len(text)),
                "first_letter": text[0]}[key]
    if key.startswith("chart_"):
        values = {d["label"]: d["value"] for d in items}
        return {"chart_max": lambda: max(values, key=values.get), "chart_min": lambda: min(values, key=values.get),
                "chart_value": lambda: str(values[f.get("label")]), "chart_count": lambda: str(len(items)),
                "chart_colour": lambda: max(items, key=lambda d: d["value"])["colour"],
                "chart_trend": lambda: "higher" if items[-1]["value"] > items[0]["value"] else "lower"}[key]()
    if key.startswith("table_"):
        (table,) = [d["table"] for d in drawn if "table" in d]
        if key == "table_rows":
            return str(len(table) - 1)
        return str(table[int(f["row"])][table[0].index(f["column"])])
    if key.startswith("marks_"):
        marks = {d["mark"]: next(s for s in shapes if s["centre"] == d["on"]) for d in drawn if "mark" in d}
        if key == "marks_number":
            (n,) = [n for n, s in marks.items() if s["colour"] == f["colour"] and s["shape"] == f["shape"]]
            return str(n)
        return marks[int(f["mark"])]["shape" if key == "marks_shape" else "colour"]
    raise AssertionError(f"no solver for {key}")


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLOURS[c])))




def check_pixels(px: np.ndarray, rec: dict) -> Counter:
    """Asserts that each recorded shape's centre shows its colour (unless a mark covers it), each bar its
    colour, and each text box ink that stands out; returns how many of each were checked."""
    checked = Counter()
    h, w = px.shape[:2]
    marks = [d for d in rec["drawn"] if "mark" in d]
    for d in rec["drawn"]:
        if "shape" in d:
            x, y = d["centre"]
            if any(math.dist((x, y), m["centre"]) < m["radius"] * 1.5 + 2 for m in marks):
                continue  # a small shape's own mark may cover its centre
            patch = px[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2].reshape(-1, 3)
            assert nearest_colour(np.median(patch, 0)) == d["colour"], (rec["id"], d)
            checked["shape"] += 1
        elif "text" in d:
            x0, y0, x1, y1 = d["box"]
            assert -2 <= x0 < x1 <= w + 2 and -2 <= y0 < y1 <= h + 2, (rec["id"], d)
            luma = px[max(0, int(y0)):int(math.ceil(y1)), max(0, int(x0)):int(math.ceil(x1))].mean(-1)
            assert np.ptp(luma) > 80, (rec["id"], d)  # ink that stands out from what is under it
            checked["text"] += 1
        elif d.get("item") == "bar":
            along = d["base"] + 0.6 * (d["tip"] - d["base"])
            x, y = (along, d["at"]) if d["horizontal"] else (d["at"], along)
            assert nearest_colour(px[int(y), int(x)]) == d["colour"], (rec["id"], d)
            checked["bar"] += 1
    return checked
