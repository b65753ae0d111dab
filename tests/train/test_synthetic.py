"""The synthetic VQA generator in its plain look (answers correct by construction, determinism, format) and the
evaluator. The varied look: test_synthetic_varied.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sphinx_edge.train import synthetic as syn
from sphinx_edge.train.painters import COLOUR_JITTER, LONG_SIDE
from sphinx_edge.train.synthetic import (
    ANSWERS,
    ASPECTS,
    COLOURS,
    NANO1_DOMAINS,
    QUESTIONS,
    SHAPES,
    answer_of,
    evaluate,
    generate,
    normalize_answer,
    question_of,
)

N = 200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("synthetic")
    path = generate(out, N, seed=0, split="train")
    return path, json.loads(path.read_text())


def _question(rec: dict) -> str:
    return rec["conversations"][0]["value"].removeprefix("<image>\n")


def _answer(rec: dict) -> str:
    return rec["conversations"][1]["value"]


def _pixels(path: Path, rec: dict) -> np.ndarray:
    with Image.open(path.parent / rec["image"]) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _colour_mask(px: np.ndarray, colour: str) -> np.ndarray:
    """Pixels drawn in (a jittered version of) a palette colour."""
    return (np.abs(px - np.array(COLOURS[colour])).max(-1) <= COLOUR_JITTER)


def _present_colours(px: np.ndarray, min_pixels: int = 20) -> list[str]:
    return [c for c in COLOURS if _colour_mask(px, c).sum() >= min_pixels]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (iterative flood fill), each as a mask."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(comp)
    return out


def _classify(mask: np.ndarray) -> str:
    """Shape kind of a single filled axis-aligned shape, from its bounding-box fill pattern."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    if fill > 0.93:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if box[-1].mean() > 0.8 else "cross"


# --------------------------------------------------------------------------- format & coverage


def test_llava_format(dataset):
    path, records = dataset
    assert path.name == "train.json" and len(records) == N
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp file left behind"
    ids = [r["id"] for r in records]
    assert len(set(ids)) == N
    for i, rec in enumerate(records):
        assert rec["id"] == f"train_{i:06d}"
        assert rec["image"] == f"images/train_{i:06d}.png"
        assert (path.parent / rec["image"]).is_file()
        assert rec["domain"] in NANO1_DOMAINS and rec["aspect"] in ASPECTS
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert all(isinstance(t["value"], str) for t in conv)
        assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
        assert "<image>" not in conv[1]["value"]


def test_every_domain_and_aspect_appears_balanced(dataset):
    _, records = dataset
    domains = Counter(r["domain"] for r in records)
    aspects = Counter(r["aspect"] for r in records)
    assert set(domains) == set(NANO1_DOMAINS) and set(aspects) == set(ASPECTS)
    assert max(domains.values()) - min(domains.values()) <= 5
    assert max(aspects.values()) - min(aspects.values()) <= 5


QUESTION_RE = {
    "colour": re.compile(r"What colour is the (circle|square|triangle|cross)\?"),
    "count": re.compile(r"How many (circles|squares|triangles|crosses) are there\?"),
    "shape": re.compile(r"What shape is shown\?"),
    "text": re.compile(r"What number is written in the image\?"),
    "position": re.compile(r"Which side is the (red|green|blue|yellow|purple|orange) "
                           r"(circle|square|triangle|cross) on\?"),
}


def test_questions_and_answers_in_vocabulary(dataset):
    _, records = dataset
    for rec in records:
        q, a = _question(rec), _answer(rec)
        assert QUESTION_RE[rec["domain"]].fullmatch(q), q
        assert a in ANSWERS[rec["domain"]], (rec["domain"], a)
        assert a == a.lower().strip() and " " not in a
        if rec["domain"] == "text":
            assert 1 <= len(a) <= 3 and (a == "0" or not a.startswith("0"))
        if rec["domain"] == "position":
            tall = syn.aspect_ratio(rec["aspect"]) < 1
            assert a in (("top", "bottom") if tall else ("left", "right"))


def test_images_have_recorded_aspect(dataset):
    path, records = dataset
    for rec in records:
        with Image.open(path.parent / rec["image"]) as im:
            assert im.mode == "RGB"
            w, h = im.size
        assert LONG_SIDE[0] <= max(w, h) <= LONG_SIDE[1]
        a, b = map(int, rec["aspect"].split(":"))
        # within rounding of the short side
        short_exact = max(w, h) * min(a, b) / max(a, b)
        assert abs(min(w, h) - short_exact) <= 0.5 + 1e-9
        assert (w >= h) == (a >= b)
        assert syn.nearest_aspect(w, h) == rec["aspect"]


# --------------------------------------------------------------------------- correct by construction


def _by_domain(records, domain):
    return [r for r in records if r["domain"] == domain]


def test_position_answers_match_pixels(dataset):
    path, records = dataset
    recs = _by_domain(records, "position")
    assert len(recs) >= 30
    for rec in recs:
        px = _pixels(path, rec)
        colour, kind = QUESTION_RE["position"].fullmatch(_question(rec)).groups()
        mask = _colour_mask(px, colour)
        assert mask.sum() > 50
        (comp,) = _components(mask)
        assert _classify(comp) == kind
        ys, xs = np.nonzero(mask)
        h, w = mask.shape
        side = {"left": xs.mean() < w / 2, "right": xs.mean() > w / 2,
                "top": ys.mean() < h / 2, "bottom": ys.mean() > h / 2}[_answer(rec)]
        assert side, (rec["id"], _answer(rec))
        # the whole shape lies in that half, and the other shape in the other half
        if _answer(rec) in ("left", "right"):
            lo_half = xs.max() < w / 2 if _answer(rec) == "left" else xs.min() > w / 2
        else:
            lo_half = ys.max() < h / 2 if _answer(rec) == "top" else ys.min() > h / 2
        assert lo_half
        others = [c for c in _present_colours(px) if c != colour]
        assert len(others) == 1


def test_count_answers_equal_connected_components(dataset):
    path, records = dataset
    recs = _by_domain(records, "count")
    assert len(recs) >= 30
    seen_counts = set()
    for rec in recs:
        px = _pixels(path, rec)
        colours = _present_colours(px)
        assert len(colours) == 1, colours
        comps = _components(_colour_mask(px, colours[0]))
        assert len(comps) == int(_answer(rec)), rec["id"]
        plural = QUESTION_RE["count"].fullmatch(_question(rec)).group(1)
        kind = {syn.PLURALS[k]: k for k in SHAPES}[plural]
        assert {_classify(c) for c in comps} == {kind}
        # identical shapes: same pixel count up to rasterisation
        sizes = [c.sum() for c in comps]
        assert max(sizes) <= 1.25 * min(sizes) + 10
        # legible: each shape spans a good part of the short side
        ys, xs = np.nonzero(comps[0])
        assert max(np.ptp(ys), np.ptp(xs)) + 1 >= min(px.shape[:2]) / 6
        seen_counts.add(len(comps))
    assert seen_counts == set(range(1, 7))


def test_colour_and_shape_answers_match_pixels(dataset):
    path, records = dataset
    for rec in _by_domain(records, "colour"):
        px = _pixels(path, rec)
        kind = QUESTION_RE["colour"].fullmatch(_question(rec)).group(1)
        present = _present_colours(px)
        assert _answer(rec) in present and 1 <= len(present) <= 3
        (comp,) = _components(_colour_mask(px, _answer(rec)))
        assert _classify(comp) == kind, rec["id"]
    for rec in _by_domain(records, "shape"):
        px = _pixels(path, rec)
        (colour,) = _present_colours(px)
        (comp,) = _components(_colour_mask(px, colour))
        assert _classify(comp) == _answer(rec), rec["id"]
        ys, xs = np.nonzero(comp)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 >= min(px.shape[:2]) / 3


def test_text_images_have_large_dark_ink(dataset):
    path, records = dataset
    for rec in _by_domain(records, "text"):
        px = _pixels(path, rec)
        ink = px.max(-1) < 100
        ys, _ = np.nonzero(ink)
        assert ink.sum() > 30
        assert np.ptp(ys) + 1 >= min(px.shape[:2]) / 4  # digits are tall
        assert px.reshape(-1, 3).max(-1).max() > 200  # light background


# --------------------------------------------------------------------------- determinism & splits


def _file_digests(json_path: Path) -> list[str]:
    recs = json.loads(json_path.read_text())
    return [hashlib.sha256((json_path.parent / r["image"]).read_bytes()).hexdigest() for r in recs]


def test_deterministic_for_seed(tmp_path):
    a = generate(tmp_path / "a", 30, seed=7)
    b = generate(tmp_path / "b", 30, seed=7, workers=3)  # the same bytes from several processes
    c = generate(tmp_path / "c", 30, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert _file_digests(a) == _file_digests(b)
    assert a.read_bytes() != c.read_bytes()
    assert not set(_file_digests(a)) & set(_file_digests(c))


def test_splits_do_not_share_images(tmp_path):
    train = generate(tmp_path, 150, seed=1, split="train")
    before = _file_digests(train)
    test = generate(tmp_path, 150, seed=2, split="test")
    assert train.name == "train.json" and test.name == "test.json"
    tr, te = json.loads(train.read_text()), json.loads(test.read_text())
    assert not {r["image"] for r in tr} & {r["image"] for r in te}

    def pixel_hashes(path, recs):
        return {hashlib.sha256(_pixels(path, r).tobytes()).hexdigest() for r in recs}

    tr_h, te_h = pixel_hashes(train, tr), pixel_hashes(test, te)
    assert len(tr_h) == len(tr) and len(te_h) == len(te)
    assert not tr_h & te_h
    # the train split is still intact after writing the test split next to it
    assert _file_digests(train) == before



def test_domain_subset_is_balanced_over_aspects(tmp_path):
    path = generate(tmp_path, 2 * len(ASPECTS), seed=3, domains=("text",))
    recs = json.loads(path.read_text())
    assert {r["domain"] for r in recs} == {"text"}
    assert Counter(r["aspect"] for r in recs) == {a: 2 for a in ASPECTS}
    assert all(question_of(r) == QUESTIONS["text"] and answer_of(r).isdigit() for r in recs)


def test_unknown_domain_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown domains.*'scribbles'"):
        generate(tmp_path / "d", 5, seed=0, domains=("text", "scribbles"))
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- evaluator


def test_normalize_answer():
    assert normalize_answer("Red") == "red"
    assert normalize_answer("  blue.  ") == "blue"
    assert normalize_answer("Left!") == "left"
    assert normalize_answer("3.") == "3"
    assert normalize_answer("the   Red\n square. ") == "the red square"
    assert normalize_answer("yes!!") == "yes"
    assert normalize_answer("") == ""
    assert normalize_answer("3.5") == "3.5"


def test_evaluate_oracle_scores_one(dataset):
    path, records = dataset
    truth = {(str(path.parent / r["image"]), _question(r)): _answer(r) for r in records}
    calls = []

    def oracle(image: Path, question: str) -> str:
        assert "<image>" not in question and Path(image).is_file()
        return truth[(str(image), question)].upper() + "."

    res = evaluate(oracle, path, progress=lambda i, n: calls.append((i, n)))
    assert res["accuracy"] == 1.0 and res["n"] == N and res["mistakes"] == []
    assert set(res["per_domain"]) == set(NANO1_DOMAINS) and all(v == 1.0 for v in res["per_domain"].values())
    assert set(res["per_aspect"]) == set(ASPECTS) and all(v == 1.0 for v in res["per_aspect"].values())
    assert res["padded_tiles"] == 1.0
    assert res["n_padded"] == sum(syn.is_padded_aspect(r["aspect"]) for r in records)
    assert calls == [(i, N) for i in range(1, N + 1)]
    json.dumps(res)  # serialisable

    assert evaluate(oracle, path, limit=10)["n"] == 10


def test_evaluate_constant_predictor_is_near_chance(dataset):
    path, records = dataset
    res = evaluate(lambda image, q: "red", path)
    reds = sum(_answer(r) == "red" for r in records)
    assert res["accuracy"] == pytest.approx(reds / N)
    assert res["accuracy"] < 0.1
    colours = _by_domain(records, "colour")
    red_share = sum(_answer(r) == "red" for r in colours) / len(colours)
    assert res["per_domain"]["colour"] == pytest.approx(red_share)
    assert res["per_domain"]["count"] == 0.0
    assert res["mistakes"] == [{"image": r["image"], "question": _question(r), "expected": _answer(r), "answer": "red"}
                               for r in records if _answer(r) != "red"]


def test_question_alone_gives_only_chance(tmp_path):
    """A 'blind' model that memorises the most frequent training answer per question."""
    train = generate(tmp_path, 450, seed=11, split="train")
    answers = defaultdict(Counter)
    for rec in json.loads(train.read_text()):
        answers[_question(rec)][_answer(rec)] += 1
    test = generate(tmp_path, 225, seed=12, split="test")

    def blind(image: Path, question: str) -> str:
        counts = answers.get(question)
        return counts.most_common(1)[0][0] if counts else ""

    res = evaluate(blind, test)
    assert res["accuracy"] < 0.3
    chance = {"colour": 1 / 6, "count": 1 / 6, "shape": 1 / 4, "text": 0.0, "position": 1 / 2}
    for d, acc in res["per_domain"].items():
        assert acc <= chance[d] + 0.2, (d, acc)


def test_evaluate_infers_aspect_when_missing(tmp_path):
    path = generate(tmp_path, 20, seed=3)
    recs = json.loads(path.read_text())
    for r in recs:
        del r["aspect"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(recs))
    res = evaluate(lambda image, q: "", bare)
    assert res["accuracy"] == 0.0 and set(res["per_aspect"]) <= set(ASPECTS)
    full = evaluate(lambda image, q: "", path)
    assert res["per_aspect"].keys() == full["per_aspect"].keys() and res["n_padded"] == full["n_padded"]


# --------------------------------------------------------------------------- extra questions


def _pairs(rec: dict) -> list[tuple[str, str]]:
    conv = rec["conversations"]
    return [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(conv[::2], conv[1::2])]


def test_extra_questions_keep_images_and_first_question(tmp_path, dataset):
    path, records = dataset
    extra = generate(tmp_path, N, seed=0, split="train", extra_questions=True)
    assert _file_digests(extra) == _file_digests(path)
    many = json.loads(extra.read_text())
    assert [_pairs(r)[0] for r in many] == [_pairs(r)[0] for r in records]
    turns = [len(_pairs(r)) for r in many]
    assert min(turns) >= 1 and sum(turns) / len(turns) > 2.5
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in many)
    assert all("<image>" not in t["value"] for r in many for t in r["conversations"][1:])


def test_extra_answers_match_pixels(tmp_path):
    path = generate(tmp_path, 180, seed=5, split="train", extra_questions=True)
    asked = Counter()
    for rec in json.loads(path.read_text()):
        px = _pixels(path, rec)
        pairs = _pairs(rec)
        assert len({q for q, _ in pairs}) == len(pairs), "a question asked twice about one image"
        for q, a in pairs[1:]:
            if m := QUESTION_RE["colour"].fullmatch(q):
                comps = _components(_colour_mask(px, a))
                assert comps and {_classify(c) for c in comps} == {m.group(1)}, (rec["id"], q, a)
                asked["colour"] += 1
            elif QUESTION_RE["shape"].fullmatch(q):
                (colour,) = _present_colours(px)
                assert {_classify(c) for c in _components(_colour_mask(px, colour))} == {a}
                asked["shape"] += 1
            elif m := QUESTION_RE["count"].fullmatch(q):
                (colour,) = _present_colours(px)
                assert len(_components(_colour_mask(px, colour))) == int(a)
                asked["count"] += 1
            elif QUESTION_RE["position"].fullmatch(q):
                assert a in ANSWERS["position"]
                asked["position"] += 1
            elif q == syn.EXTRA_QUESTIONS["digits"]:
                assert a == str(len(_answer(rec)))
                asked["digits"] += 1
            elif q == syn.EXTRA_QUESTIONS["first_digit"]:
                assert a == _answer(rec)[0]
                asked["first_digit"] += 1
            else:
                raise AssertionError(f"unexpected question {q!r}")
    assert set(asked) == {"colour", "shape", "count", "position", "digits", "first_digit"}
