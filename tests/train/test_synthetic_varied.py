"""The synthetic generator's varied look (Nano 2's data): every answer follows the drawing record, the
record follows the pixels, and the set is deterministic for a seed with any number of workers."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sphinx_edge.train import synthetic as syn
from sphinx_edge.train.painters import ASPECTS, VARIED_ASPECT_SPREAD, VARIED_LONG_SIDE
from sphinx_edge.train.synthetic import DOMAINS, TEMPLATES, generate
from tests.train.drawing_records import check_pixels, parse, solve

N = 162  # two blocks of every (domain, aspect): 18 per domain


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = generate(tmp_path_factory.mktemp("varied"), N, seed=0, extra_questions=True, look="varied")
    return path, json.loads(path.read_text())


def _pairs(rec: dict) -> list[tuple[str, str]]:
    conv = rec["conversations"]
    return [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(conv[::2], conv[1::2])]


def test_every_answer_follows_the_drawing_record(varied):
    path, records = varied
    assert Counter(r["domain"] for r in records) == {d: N // len(DOMAINS) for d in DOMAINS}
    asked, wordings = Counter(), Counter()
    for rec in records:
        pairs = _pairs(rec)
        assert len({q for q, _ in pairs}) == len(pairs), f"{rec['id']}: a question asked twice"
        for question, answer in pairs:
            assert sum(bool(p.fullmatch(question)) for _, p in syn._PATTERNS) == 1, f"ambiguous: {question!r}"
            key, fields = parse(question)
            assert solve(rec, key, fields) == answer, (rec["id"], question, answer)
            asked[key] += 1
            wordings[question.split()[0]] += 1
        assert parse(pairs[0][0])[0].split("_")[0] == rec["domain"]  # the domain's own question first
    assert set(TEMPLATES) - set(asked) <= {"chart_trend"}  # (line charts are 30 % of wide charts)
    assert len(wordings) >= 8  # paraphrases are drawn


def _pixels(path: Path, rec: dict) -> np.ndarray:
    with Image.open(path.parent / rec["image"]) as im:
        assert list(im.size) == rec["size"] and im.mode == "RGB"
        return np.asarray(im).astype(np.int16)


def test_the_drawing_record_follows_the_pixels(varied):
    path, records = varied
    checked = Counter()
    for rec in records:
        checked += check_pixels(_pixels(path, rec), rec)
    assert min(checked.values()) >= 18 and set(checked) == {"shape", "text", "bar"}


def test_sizes_aspects_and_files(varied):
    path, records = varied
    suffixes = Counter(Path(r["image"]).suffix for r in records)
    assert set(suffixes) == {".png", ".jpg"} and suffixes[".jpg"] >= N // 8
    longs = []
    for rec in records:
        w, h = rec["size"]
        longs.append(max(w, h))
        assert min(w, h) >= 48 and max(w, h) <= VARIED_LONG_SIDE[1]
        ratio = math.log(w / h)
        assert abs(ratio) <= math.log(4) + 0.01
        planned = math.log(syn.aspect_ratio(rec["aspect"]))
        assert abs(ratio - planned) <= VARIED_ASPECT_SPREAD + 0.05 or abs(ratio) >= math.log(4) - 0.01
        assert rec["aspect"] in ASPECTS and rec["look"] == "varied"
    assert min(longs) < 250 and max(longs) > 1000  # the whole range is drawn


def _digests(json_path: Path) -> list[str]:
    return [hashlib.sha256((json_path.parent / r["image"]).read_bytes()).hexdigest()
            for r in json.loads(json_path.read_text())]


def test_deterministic_for_a_seed_with_any_number_of_workers(tmp_path):
    a = generate(tmp_path / "a", 27, seed=4, look="varied", extra_questions=True)
    b = generate(tmp_path / "b", 27, seed=4, look="varied", extra_questions=True, workers=2)
    c = generate(tmp_path / "c", 27, seed=5, look="varied", extra_questions=True)
    assert a.read_bytes() == b.read_bytes() and _digests(a) == _digests(b)
    assert not set(_digests(a)) & set(_digests(c))


def test_held_out_records_ask_one_question_and_plain_stays_nano1s(tmp_path):
    path = generate(tmp_path / "t", 18, seed=1, split="test", look="varied")
    assert all(len(r["conversations"]) == 2 for r in json.loads(path.read_text()))
    plain = json.loads(generate(tmp_path / "p", 10, seed=1).read_text())
    assert {r["domain"] for r in plain} <= set(syn.NANO1_DOMAINS) and "drawn" not in plain[0]
    with pytest.raises(ValueError, match="unknown look"):
        generate(tmp_path / "x", 5, seed=0, look="sketchy")
    assert not (tmp_path / "x").exists()


def test_paraphrases_read_back_to_their_canonical_wording():
    assert syn.canonical_question("What color is the cross?") == "What colour is the cross?"
    assert syn.canonical_question("Which value is in row 2 under price?") == "What is in row 2, column price?"
    assert syn.canonical_question("Count the circles.") == "How many circles are there?"
    assert syn.canonical_question("What is in the picture?") == "What is in the picture?"  # no template: itself
    assert syn.parse_question("What is the value of bar F?") is None  # F labels no bar
