"""The CLI over a corpus of odd image files built here (tests/odd_images.py): every format Pillow
writes, each also truncated, corrupted and oversized, decompression bombs, broken headers of formats
Pillow only reads. For every file: no traceback, exit code 0 or 2, the export directory unchanged;
a file Pillow itself decodes is accepted; a bomb is refused."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image
from typer.testing import CliRunner

from sphinx_edge.cli import app
from tests.odd_images import build_corpus

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd-images")
    return d, build_corpus(d)


def _snapshot(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _pillow_decodes(path) -> bool:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - whatever Pillow raises: it cannot
        return False


def _invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: {type(result.exception).__name__} escaped: {result.exception}")
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_request_over_every_odd_image(corpus, onnx_export, tmp_path):
    directory, kinds = corpus
    _, export_dir, _ = onnx_export
    before = _snapshot(export_dir)
    outcomes = {}
    for name, kind in sorted(kinds.items()):
        path = directory / name
        code, out = _invoke("request", export_dir, "--image", path, "What is it?", "--out", tmp_path / "r.bin")
        assert code in (0, 2), f"{name}: exit code {code}\n{out}"
        if code == 2:
            assert name in out, f"{name}: the error does not name the file:\n{out}"
        if kind in ("good", "oversized") and _pillow_decodes(path):
            assert code == 0, f"{name} decodes in Pillow but was refused:\n{out}"
        if kind == "bomb":
            assert code == 2 and ("too large" in out or "cannot read" in out), out
        outcomes[kind] = outcomes.get(kind, 0) + (code == 0)
    assert _snapshot(export_dir) == before
    assert len([k for k in kinds.values() if k == "good"]) >= 100  # every writable format, in several modes
    assert outcomes["good"] >= 100 and outcomes.get("bomb", 0) == 0


def test_tiles_over_the_whole_corpus_in_one_call(corpus):
    """One bad file does not abort the table: every unreadable file gets its own error line."""
    from sphinx_edge.layout import ImageLoadError, image_size

    directory, kinds = corpus
    code, out = _invoke("tiles", *(directory / n for n in sorted(kinds)))
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    unreadable = []
    for name in sorted(kinds):
        try:
            image_size(directory / name)
        except ImageLoadError:
            unreadable.append(name)
    assert len(errors) == len(unreadable) >= sum(k in ("bomb", "broken") for k in kinds.values()), out[-3000:]
    assert all(any(name in e for e in errors) for name in unreadable)


def test_run_answers_or_refuses_odd_images_end_to_end(corpus, onnx_export):
    directory, kinds = corpus
    _, export_dir, _ = onnx_export
    before = _snapshot(export_dir)
    picked = [n for n in sorted(kinds) if n.startswith(("PNG-", "truncated-JPEG", "corrupted-GIF", "oversized-thin-",
                                                         "TIFF-ifd", "DDS-", "FITS-", "PNG-text"))]
    assert len(picked) >= 8
    for name in picked:
        code, out = _invoke("run", export_dir, "--image", directory / name, "What is it?",
                            "--max-new-tokens", "2")
        assert code in (0, 2), f"{name}: {out}"
    assert _snapshot(export_dir) == before
