"""The independent evaluation renderer: deterministic, and every answer agrees with the drawing record
and the record with the pixels."""

import json
import math

from PIL import Image

from sphinx_edge.train import independent
from sphinx_edge.train.synthetic import COLOURS, PLURALS

N = 30


def _nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: math.dist(COLOURS[name], rgb))


def test_the_same_seed_gives_the_same_files(tmp_path):
    a = independent.generate(tmp_path / "a", 10, seed=3)
    b = independent.generate(tmp_path / "b", 10, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for record in json.loads(a.read_text()):
        assert (a.parent / record["image"]).read_bytes() == (b.parent / record["image"]).read_bytes()
    c = independent.generate(tmp_path / "c", 10, seed=4)
    assert c.read_bytes() != a.read_bytes()


def test_answers_follow_the_drawing_and_the_drawing_the_pixels(tmp_path):
    path = independent.generate(tmp_path, N, seed=0)
    records = json.loads(path.read_text())
    assert {r["domain"] for r in records} == set(independent.DOMAINS)
    for r in records:
        question = r["conversations"][0]["value"].split("\n", 1)[1]
        answer = r["conversations"][1]["value"]
        drawn = r["drawn"]
        image = Image.open(path.parent / r["image"]).convert("RGB")
        assert list(image.size) == r["size"] and min(image.size) >= independent.MIN_SHORT_SIDE
        for shape in (d for d in drawn if "shape" in d):  # the centre pixel shows the named colour
            cx, cy = shape["centre"]
            assert _nearest_colour(image.getpixel((int(cx), int(cy)))) == shape["colour"], (r["id"], shape)
        if r["domain"] == "colour":
            asked = [d for d in drawn if question == f"What colour is the {d['shape']}?"]
            assert len(asked) == 1 and asked[0]["colour"] == answer
        elif r["domain"] == "count":
            assert len(drawn) == int(answer) and question == f"How many {PLURALS[drawn[0]['shape']]} are there?"
        elif r["domain"] == "shape":
            assert len(drawn) == 1 and drawn[0]["shape"] == answer
        elif r["domain"] == "text":
            assert drawn[0]["text"] == answer
            x0, y0, x1, y1 = drawn[0]["box"]
            ink = image.crop((int(x0), int(y0), math.ceil(x1), math.ceil(y1))).convert("L")
            assert ink.getextrema()[0] < 120  # dark strokes inside the recorded box
        else:
            target = next(d for d in drawn if question == f"Which side is the {d['colour']} {d['shape']} on?")
            w, h = r["size"]
            along, long_ = (target["centre"][1], h) if h > w else (target["centre"][0], w)
            assert answer == (("top", "bottom") if h > w else ("left", "right"))[along > long_ / 2]


def test_the_cli_writes_a_set_that_eval_reads(tmp_path):
    from sphinx_edge.train.synthetic import evaluate
    from tests.test_cli import run

    code, out = run("data", "independent", "--out", tmp_path / "set", "--n", "5")
    assert code == 0, out
    answers = {r["image"]: r["conversations"][1]["value"] for r in json.loads((tmp_path / "set/test.json").read_text())}
    scores = evaluate(lambda image, question: answers[f"images/{image.name}"], tmp_path / "set" / "test.json")
    assert scores["n"] == 5 and scores["accuracy"] == 1.0
