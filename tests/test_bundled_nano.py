"""The SPHINX-Nano that ships (Nano 2 on 192 px views): it loads from the package, fits the size
budget, and answers held-out synthetic questions and pictures its generator never drew well above
what the answer priors alone give."""

import functools
import json
from pathlib import Path

from sphinx_edge.bundled import SAMPLES, WEIGHTS
from sphinx_edge.train.synthetic import ANSWERS, generate as synthesize
from tests.test_cli import run

NANO = WEIGHTS / "nano"


def test_bundled_files_and_size():
    files = {p.name for p in NANO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= files
    assert sum(p.stat().st_size for p in NANO.iterdir()) < 25 * 2**20
    assert json.loads((NANO / "config.json").read_text())["config"]["name"] == "nano"


def test_the_registered_nano_is_the_one_that_ships():
    """`info`, `tiles` and `export --random-init` describe Nano from its registry entry: it must be what
    the bundled weights hold (their views above all: 192 px since the last stage of `make nano`)."""
    from sphinx_edge.checkpoints import checkpoint_config
    from sphinx_edge.config import get_config

    assert checkpoint_config(NANO, "nano") == get_config("nano")


def test_chat_answers_from_the_bundled_weights():
    code, out = run("chat", "--size", "nano", "--image", SAMPLES / "shapes_2x1.png",
                    "Which side is the yellow triangle on?", "--max-new-tokens", "8")
    assert code == 0, out
    assert out.split()[0].strip(".").lower() in ANSWERS["position"]


@functools.cache
def _bundled():
    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.tokenizer import Tokenizer

    return load_model(NANO, "nano"), Tokenizer(NANO / "tokenizer.model")


def _accuracy(data: Path) -> dict:
    from sphinx_edge.generate import generate
    from sphinx_edge.train.synthetic import evaluate

    model, tok = _bundled()  # loaded once for the three accuracy tests
    return evaluate(lambda image, q: generate(model, tok, q, image, max_new_tokens=8).text, data)


def test_held_out_accuracy_is_far_above_the_priors(tmp_path):
    """Nano 2's training generator (the varied look, nine domains; the priors alone: 23.7 %)."""
    data = synthesize(tmp_path, 90, seed=1, split="test", look="varied")  # the first 90 of data/nano2/test.json
    result = _accuracy(data)
    assert result["accuracy"] >= 0.5, result  # 61.1 % on these 90, 58.3 % on all 900 (benchmarks/RESULTS.md)


def test_nano_1s_plain_pictures_are_still_answered(tmp_path):
    """Nano 2 starts from Nano 1, whose data (the plain look, five domains) it no longer trains on."""
    data = synthesize(tmp_path, 60, seed=1, split="test")  # the first 60 of Nano 1's data/nano/test.json
    result = _accuracy(data)
    assert result["accuracy"] >= 0.75, result  # 85.0 % on these 60 (Nano 1: 88.3 %, Nano 2 on 128 px views: 78.3 %)


def test_independent_accuracy_is_above_the_priors(tmp_path):
    """Pictures the training generator never drew (train/independent.py), all nine domains; the priors
    alone give about 15 %."""
    from sphinx_edge.train import independent

    data = independent.generate(tmp_path, 45, seed=0)  # the first 45 of data/independent (RESULTS.md)
    result = _accuracy(data)
    assert result["accuracy"] >= 0.4, result  # 51.1 % on these 45, 55.6 % on all 450 (benchmarks/RESULTS.md)


def test_the_bundled_export_is_of_the_bundled_weights_and_answers_like_them():
    """The int4 ONNX export that ships (`make bundled-export`) was made from the weights that ship now,
    its files are intact, and it answers held-out questions as the PyTorch model does, mostly."""
    from sphinx_edge.bundled import NANO_EXPORT
    from sphinx_edge.runtime.manifest import check_files, read_manifest, sha256
    from sphinx_edge.runtime.pipeline import Pipeline

    manifest = read_manifest(NANO_EXPORT)
    assert manifest["source"] == {"bundled": "nano", "weights": {"model.safetensors": sha256(NANO / "model.safetensors")}}, \
        "the bundled export is stale: run `make bundled-export`"
    check_files(NANO_EXPORT, manifest, list(manifest["files"]))
    config = json.loads((NANO / "config.json").read_text())["config"]
    assert manifest["model"]["config"] == config and manifest["quantization"]["quant"] == "int4"
    pipeline = Pipeline(NANO_EXPORT)
    answer = pipeline.answer("Which side is the yellow triangle on?", SAMPLES / "shapes_2x1.png", max_new_tokens=8)
    assert answer.text.split()[0].strip(".").lower() in ANSWERS["position"], answer.text


def test_the_sample_questions_are_well_formed():
    """Every question the README, demo and browser page ask about the samples is in the question file, in a
    template the models are trained on, about a sample that exists, with an answer of its domain."""
    from sphinx_edge.bundled import SAMPLE_QUESTIONS
    from sphinx_edge.cli import DEMO_IMAGE, DEMO_QUESTION
    from tests.train.drawing_records import parse

    records = json.loads(SAMPLE_QUESTIONS.read_text())
    asked = {(r["image"], r["conversations"][0]["value"].removeprefix("<image>\n")) for r in records}
    assert (DEMO_IMAGE.name, DEMO_QUESTION) in asked
    for r in records:
        assert (SAMPLES / r["image"]).is_file()
        key, _ = parse(r["conversations"][0]["value"].removeprefix("<image>\n"))
        answer = r["conversations"][1]["value"]
        assert answer in ANSWERS[r["domain"]] or (key == "which_shape" and answer in ANSWERS["shape"]), r
