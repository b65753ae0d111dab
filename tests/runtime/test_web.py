"""runtime/web: the browser demo computes what the Python runtime computes.

(a) tiling.js == layout.py and (b) tokenizer.js == sentencepiece, on vectors that web_vectors.py writes
and node's test runner checks; (c) end to end: a nano int4 ONNX export built into the demo site, served
on localhost, the page driven in headless Chromium (playwright-core) on held-out synthetic questions:
the page answers exactly as `Pipeline(export, "onnx")` does, and correctly where that does.
Every test that needs node, the npm packages or chromium skips and says how to install them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from sphinx_edge.bundled import NANO_EXPORT, SAMPLES
from sphinx_edge.runtime.pipeline import Pipeline
from sphinx_edge.runtime.web_bundle import WEB_DIR, WebBundleError, build_site, make_server, sample_index, tokenizer_json
from conftest import ask_in_browser, need_node
from web_vectors import bundled_tokenizer, write_tiling_vectors, write_tokenizer_vectors

def _node_test(files: list[str], vectors: Path) -> str:
    """Runs node's test runner on runtime/web/test files; fails on any failure or skip."""
    result = subprocess.run([need_node(), "--test", *files], cwd=WEB_DIR, capture_output=True, text=True,
                            timeout=180, env={**os.environ, "SPHINX_WEB_VECTORS": str(vectors)})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped) (\d+)$", out, re.M)}
    assert counts.get("pass", 0) > 0 and counts.get("fail") == 0 and counts.get("skipped") == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web_vectors")
    write_tiling_vectors(out)
    write_tokenizer_vectors(bundled_tokenizer(), out)
    return out


# ------------------------------------------------------------------------------------------------
# (a), (b): the JS modules against the Python ones


def test_js_tiling_matches_python(vectors):
    out = _node_test(["test/tiling.test.mjs"], vectors)
    assert "full_tiny_300x140" in out and "alpha_41x29" in out


def test_js_tokenizer_matches_sentencepiece(vectors):
    _node_test(["test/tokenizer.test.mjs"], vectors)


def test_js_tokenizer_matches_other_normaliser_flags(tmp_path):
    """A BPE model with extra-whitespace removal and no byte fallback takes the other code paths."""
    import sentencepiece as spm
    from conftest import CORPUS

    (tmp_path / "corpus.txt").write_text(CORPUS * 20)
    spm.SentencePieceTrainer.Train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "bpe"), vocab_size=120, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, byte_fallback=False,
        normalization_rule_name="identity", remove_extra_whitespaces=True, user_defined_symbols=["\n", "###"])
    write_tokenizer_vectors(tmp_path / "bpe.model", tmp_path / "vectors")
    _node_test(["test/tokenizer.test.mjs"], tmp_path / "vectors")


# ------------------------------------------------------------------------------------------------
# The site builder and server (Python only)


def test_tokenizer_json_refuses_what_tokenizer_js_cannot_do(tokenizer_file, tmp_path):
    with pytest.raises(WebBundleError, match="UNIGRAM model; tokenizer.js implements BPE only"):
        tokenizer_json(tokenizer_file)
    (tmp_path / "junk.model").write_bytes(b"\xff not a model")
    with pytest.raises(WebBundleError, match="is not a SentencePiece model"):
        tokenizer_json(tmp_path / "junk.model")


def test_build_site_explains_missing_pieces(tmp_path):
    from sphinx_edge.runtime.manifest import ManifestError

    with pytest.raises(ManifestError, match="no manifest.json"):
        build_site(tmp_path, tmp_path / "site")


def test_server_sends_wasm_type_and_isolation_headers(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "x.wasm").write_bytes(b"\0asm")
    (tmp_path / "m.mjs").write_text("export {}")
    server = make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(base + "x.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm"
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(base + "m.mjs") as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(WebBundleError, match="has no index.html"):
        make_server(tmp_path / "nowhere", port=0)


# ------------------------------------------------------------------------------------------------
# (c) end to end in headless Chromium


@pytest.fixture(scope="module")
def nano_int4_export() -> Path:
    """The bundled SPHINX-Nano int4 ONNX export (what `sphinx-edge web` serves by default; its staleness
    and its answers are checked in tests/test_bundled_nano.py)."""
    return NANO_EXPORT


def _held_out_cases(export: Path, workdir: Path, n: int = 16) -> list[dict]:
    """Held-out synthetic questions with the Python runtime's answers: up to 4 it answers correctly
    (one with skipped tiles first, if any) and one it gets wrong (the page must repeat the mistake)."""
    from PIL import Image

    from sphinx_edge.layout import plan_tiles
    from sphinx_edge.runtime.pipeline import Pipeline
    from sphinx_edge.train.synthetic import answer_of, generate, normalize_answer, question_of

    data = generate(workdir / "data", n, seed=1, split="test")
    pipeline = Pipeline(export, "onnx")
    cfg = pipeline.config
    cases = []
    for rec in json.loads(data.read_text()):
        image, question = data.parent / rec["image"], question_of(rec)
        answer = pipeline.answer(question, image, max_new_tokens=16)
        with Image.open(image) as im:
            encoded = list(plan_tiles(*im.size, layout=cfg.layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                                      dino_size=cfg.dinov2.image_size).encoded)
        cases.append({"image": str(image), "question": question, "truth": answer_of(rec), "text": answer.text,
                      "ids": answer.token_ids, "prompt_len": answer.prompt_len, "image_tokens": answer.image_tokens,
                      "encoded": encoded, "correct": normalize_answer(answer.text) == normalize_answer(answer_of(rec))})
    right = [c for c in cases if c["correct"]]
    assert len(right) >= 3, f"the bundled Nano answered only {len(right)} of {n} held-out questions correctly"
    padded = [c for c in right if not all(c["encoded"])]
    chosen = (padded[:1] + [c for c in right if c not in padded[:1]])[:4]
    return chosen + [c for c in cases if not c["correct"]][:1]


def _decode_cases(workdir: Path) -> list[Path]:
    """PNGs in other modes: grey, palette, RGBA with binary alpha (transparent -> white)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (23, 37, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rgba[..., 3] > 127, 255, 0)
    paths = {"grey_L.png": Image.fromarray(rgba[..., 0]), "palette_P.png": Image.fromarray(rgba[..., :3]).quantize(16),
             "binary_alpha_RGBA.png": Image.fromarray(rgba)}
    for name, image in paths.items():
        image.save(workdir / name)
    return [workdir / name for name in paths]


def _rgb_sha256(path: str) -> str:
    import hashlib

    import numpy as np

    from sphinx_edge.layout import load_image

    return hashlib.sha256(np.asarray(load_image(path), np.uint8).tobytes()).hexdigest()


def test_browser_answers_like_python(browser_tools, nano_int4_export, tmp_path):
    from sphinx_edge.train.synthetic import normalize_answer

    node = browser_tools

    cases = _held_out_cases(nano_int4_export, tmp_path)
    decode_only = _decode_cases(tmp_path)
    site = build_site(nano_int4_export, tmp_path / "site")
    gallery = sample_index()
    sample = gallery[-1]  # the last sample image and its second suggested question, clicked on the page
    suggested = {"sample": sample["image"], "suggestion": 1, "image": str(SAMPLES / sample["image"])}
    result = ask_in_browser(node, site, [{"image": c["image"], "question": c["question"]} for c in cases]
                            + [suggested] + [{"image": str(p)} for p in decode_only], tmp_path, max_new_tokens=16)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(pages) == len(cases) + 1 + len(decode_only), result.stdout[-3000:]
    for page in pages:  # the browser decodes each PNG to the RGB bytes that PIL gives the Python runtime
        assert page["rgbSha256"] == _rgb_sha256(page["image"]), f"{Path(page['image']).name}: {page['status']}"
    # every bundled sample is offered, and its suggestion asks its question about it, as Python answers it
    assert sorted(p.name for p in (site / "samples").glob("*.png")) == sorted(e["image"] for e in gallery)
    page = pages[len(cases)]
    question = sample["questions"][1]
    want = Pipeline(nano_int4_export, "onnx").answer(question, SAMPLES / sample["image"], max_new_tokens=16)
    assert page["state"] == "done" and page["asked"] == question, (page["status"], page["errors"])
    assert page["result"]["tokenIds"] == want.token_ids and page["shown"] == want.text
    pages = pages[:len(cases)]

    for want, page in zip(cases, pages):
        where = f"{Path(want['image']).name}: {want['question']!r}"
        assert page["state"] == "done", f"{where}: {page['status']}; {page['errors']}"
        assert page["errors"] == [], f"{where}: {page['errors']}"
        got = page["result"]
        assert got["encoded"] == want["encoded"], where
        assert (got["promptLen"], got["imageTokens"]) == (want["prompt_len"], want["image_tokens"]), where
        assert got["tokenIds"] == want["ids"], where
        assert got["text"] == want["text"] and page["shown"] == want["text"], where
        if want["correct"]:
            assert normalize_answer(got["text"]) == normalize_answer(want["truth"]), where
    assert pages[0]["isolated"], "the page was not cross-origin isolated: wasm ran single-threaded"
    for page in pages:  # shown with -s; speed figures belong to benchmarks, not to this test
        t = page["result"]["timings"]
        print(f"\n{Path(page['image']).name}: {page['shown']!r} | vision {t['vision']:.0f} ms ({t['views']} views), "
              f"prefill {t['prefill']:.0f} ms ({t['prefillTokens']} tok), decode {t['decode']:.0f} ms "
              f"({t['decodeTokens']} tok)")
