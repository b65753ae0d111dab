"""Encoded images are kept (in memory and in --cache-dir) and a new conversation about the image in
the KV cache prefills only its text; neither changes an answer. On the bundled SPHINX-Nano export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from sphinx_edge.bundled import NANO_EXPORT, SAMPLES
from sphinx_edge.runtime.image_cache import SUFFIX, ImageCache, export_key, image_key
from sphinx_edge.runtime.pipeline import Pipeline
from tests.test_cli import run

IMAGE = SAMPLES / "shapes_2x1.png"
FIRST, SECOND = "Which side is the yellow triangle on?", "What color is the circle?"


@pytest.fixture(scope="module")
def uncached() -> dict[str, list[int]]:
    """Each question answered by its own fresh pipeline, nothing cached: the reference tokens."""
    return {q: Pipeline(NANO_EXPORT).answer(q, IMAGE, max_new_tokens=8).token_ids for q in (FIRST, SECOND)}


def test_a_cached_image_answers_exactly_as_an_encoded_one(tmp_path, uncached):
    first = Pipeline(NANO_EXPORT, cache_dir=tmp_path).answer(FIRST, IMAGE, max_new_tokens=8)
    assert "image_cached" not in first.timings and len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1
    again = Pipeline(NANO_EXPORT, cache_dir=tmp_path).answer(FIRST, IMAGE, max_new_tokens=8)  # another process's view
    assert again.timings["image_cached"] == 1.0 and again.timings["vision"] == 0.0
    assert first.token_ids == again.token_ids == uncached[FIRST]
    assert again.image_tokens == first.image_tokens


def test_a_new_conversation_about_the_same_image_prefills_only_its_text(uncached):
    pipeline = Pipeline(NANO_EXPORT)
    first = pipeline.answer(FIRST, IMAGE, max_new_tokens=8)
    second = pipeline.answer(SECOND, IMAGE, max_new_tokens=8)
    text_tokens = second.prompt_len - second.image_tokens
    assert first.prefilled == first.prompt_len
    assert second.prefilled == text_tokens - 1  # BOS and the image stayed in the KV cache
    assert second.timings["image_cached"] == 1.0
    assert second.token_ids == uncached[SECOND]
    # Another image, then back: the prefix of the first is gone, so it is prefilled again.
    pipeline.answer(SECOND, SAMPLES / "square.png", max_new_tokens=4)
    third = pipeline.answer(FIRST, IMAGE, max_new_tokens=8)
    assert third.prefilled == third.prompt_len and third.token_ids == uncached[FIRST]


def test_a_changed_image_or_export_misses(tmp_path):
    manifest = Pipeline(NANO_EXPORT, None).manifest
    files = ["vision_encoder.onnx", "vision_encoder.onnx.data", "token_embedding.onnx", "token_embedding.onnx.data"]
    base = export_key(manifest, files)
    other = copy.deepcopy(manifest)
    other["files"]["vision_encoder.onnx.data"]["sha256"] = "0" * 64
    assert export_key(other, files) != base
    decoder_only = copy.deepcopy(manifest)
    decoder_only["files"]["decoder.onnx.data"]["sha256"] = "0" * 64
    assert export_key(decoder_only, files) == base  # the decoder does not compute the image part
    pixels = np.asarray(Image.open(IMAGE).convert("RGB")).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(tmp_path / "changed.png")
    assert image_key(base, IMAGE, "sphinx-x") != image_key(base, tmp_path / "changed.png", "sphinx-x")
    assert image_key(base, IMAGE, "sphinx-x") != image_key(base, IMAGE, "sphinx-1k")
    assert image_key(base, IMAGE, "sphinx-x") == image_key(base, IMAGE.read_bytes(), "sphinx-x")
    assert image_key(base, IMAGE, "sphinx-x") != image_key(base, IMAGE, "sphinx-x", max_views=1)

    pipeline = Pipeline(NANO_EXPORT, cache_dir=tmp_path / "cache")
    pipeline.answer(FIRST, IMAGE, max_new_tokens=2)
    assert "image_cached" not in pipeline.answer(FIRST, tmp_path / "changed.png", max_new_tokens=2).timings
    full = pipeline.answer(FIRST, IMAGE, max_new_tokens=2)
    budget = Pipeline(NANO_EXPORT, cache_dir=tmp_path / "cache", max_views=1).answer(FIRST, IMAGE, max_new_tokens=2)
    assert full.timings["image_cached"] == 1.0 and "image_cached" not in budget.timings  # another view budget
    assert budget.image_tokens < full.image_tokens


@pytest.mark.parametrize("damage", ["flip a byte", "cut short", "not ours"])
def test_a_corrupted_entry_is_refused_and_recomputed(tmp_path, damage, uncached):
    Pipeline(NANO_EXPORT, cache_dir=tmp_path).answer(FIRST, IMAGE, max_new_tokens=8)
    (entry,) = tmp_path.glob(f"*{SUFFIX}")
    raw = bytearray(entry.read_bytes())
    if damage == "flip a byte":
        raw[-5] ^= 0xFF
    elif damage == "cut short":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"PNG?" + raw[4:])
    entry.write_bytes(bytes(raw))
    pipeline = Pipeline(NANO_EXPORT, cache_dir=tmp_path)
    answer = pipeline.answer(FIRST, IMAGE, max_new_tokens=8)
    assert "image_cached" not in answer.timings and answer.token_ids == uncached[FIRST]
    assert pipeline.image_cache.refused and entry.name in pipeline.image_cache.refused[0]
    assert ImageCache(tmp_path).get(entry.stem) is not None  # written again, whole


def test_the_disk_cache_keeps_the_most_recently_used_within_its_bound(tmp_path):
    import os

    cache = ImageCache(tmp_path, max_bytes=3 * 4096 + 3 * 400)  # room for three 1024-float entries
    for i in range(3):
        cache.put(f"k{i}", np.full((1024,), i, np.float32), {"views": 1})
        os.utime(tmp_path / f"k{i}{SUFFIX}", (i, i))  # a clear order of use
    assert ImageCache(tmp_path).get("k0") is not None  # k0 is now the most recently used
    cache.put("k3", np.zeros(1024, np.float32), {"views": 1})
    assert sorted(p.stem for p in tmp_path.glob(f"*{SUFFIX}")) == ["k0", "k2", "k3"]


def test_run_says_when_the_image_came_from_the_cache(tmp_path):
    args = ("run", "--image", IMAGE, FIRST, "--max-new-tokens", "4", "--cache-dir", tmp_path)
    code, out = run(*args)
    assert code == 0 and "image from the cache" not in out
    code, again = run(*args)
    assert code == 0 and "image from the cache" in again and again.split()[0] == out.split()[0]
