"""The C++ runner (runtime/cpp): the greedy tokens and text of the Python ExecuTorch pipeline, built
for this machine and cross-built for aarch64 (run under qemu-user), on the SPHINX-Nano int4 export.

Builds go through runtime/cpp/build.sh into build/cpp-<arch> (incremental). The export is conftest's
`nano_int4_pte`, made once per session. The image cache (`--cache-dir`) is shared with the Python
runtime: each reads the other's entries.
Each test that lacks a tool skips and says which one and how to get it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import missing_tool, run_torch_free
from sphinx_edge.benchmarks.device_output import RunnerOutputError, parse_runner_output
from sphinx_edge.config import get_config
from sphinx_edge.runtime.image_cache import ImageCache, export_key, image_key
from sphinx_edge.runtime.image_cache import MAGIC as IMAGE_MAGIC
from sphinx_edge.runtime.request import (ALIGN, MAGIC, decode_request, encode_request, read_request_header,
                                         write_request)

ROOT = Path(__file__).resolve().parents[2]
_NANO = get_config("nano")  # the bundled weights' (tests/test_bundled_nano.py checks)
TILE = _NANO.convnext.image_size  # a view's side
ROWS = TILE + _NANO.dinov2.image_size  # a packed view: the ConvNeXt view above the DINOv2 one
IMAGE_TOKENS_2X1 = 3 * _NANO.tokens_per_view + 2  # shapes_2x1.png: 3 views, 2 skip tokens
CPP = ROOT / "runtime" / "cpp"
ASSETS = ROOT / "sphinx_edge" / "assets"
AARCH64_LIBS = Path(os.environ.get("SPHINX_EXECUTORCH_AARCH64",
                                   "~/.cache/sphinx-edge/executorch-aarch64/executorch")).expanduser() / "lib"
INSTALL = "run runtime/cpp/install-deps.sh"
# (image, question): square (5 views), 2:1 (2 skip tokens), 1:3 tall (2 skip tokens, longest answer).
CASES = [("square.png", "What is in the image?"), ("shapes_2x1.png", "What colour is the circle?"),
         ("tall_1x3.png", "What is written in the image?")]
MAX_NEW = 16


def _require(*tools: tuple[str, str]) -> None:
    for command, package in tools:
        if shutil.which(command) is None:
            missing_tool(f"C++ runner: {command} not found ({package} not installed); {INSTALL}")


def _build(arch: str) -> Path:
    proc = subprocess.run(["bash", str(CPP / "build.sh"), arch], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"runtime/cpp/build.sh {arch} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def native_runner() -> list[str]:
    _require(("cmake", "cmake"), ("g++", "g++"))
    return [str(_build(platform.machine()))]


@pytest.fixture(scope="session")
def aarch64_runner() -> list[str]:
    if platform.machine() != "x86_64":
        pytest.skip(f"C++ runner: the qemu-aarch64 tests cross-build from x86_64, not {platform.machine()}")
    _require(("cmake", "cmake"), ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
             ("qemu-aarch64", "qemu-user"))
    if not (AARCH64_LIBS / "libexecutorch.so").is_file():
        missing_tool(f"C++ runner: no aarch64 ExecuTorch libraries in {AARCH64_LIBS}; {INSTALL}")
    _build("aarch64")
    return ["bash", str(CPP / "qemu-aarch64.sh")]


@pytest.fixture(scope="session")
def nano_export(nano_int4_pte) -> Path:
    return nano_int4_pte


@pytest.fixture(scope="session")
def requests(nano_export, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("requests")
    paths = {}
    for image, question in CASES:
        paths[image] = d / f"{image}.bin"
        write_request(nano_export, ASSETS / image, question, paths[image], max_new_tokens=MAX_NEW)
    paths["text-only"] = d / "text-only.bin"
    write_request(nano_export, None, "hello", paths["text-only"])
    return paths


@pytest.fixture(scope="session")
def reference(nano_export) -> dict:
    """What the Python runtime answers (greedy, ExecuTorch backend): the answers to match."""
    from sphinx_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline(nano_export, "pte")
    answers = {image: pipeline.answer(question, ASSETS / image, max_new_tokens=MAX_NEW)
               for image, question in CASES}
    image, question = CASES[-1]
    answers["length"] = pipeline.answer(question, ASSETS / image, max_new_tokens=2)
    return answers


def _run(runner: list[str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([*runner, *map(str, args)], capture_output=True, text=True, encoding="utf-8",
                          timeout=300)


def _answer(runner: list[str], *args) -> dict:
    proc = _run(runner, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return parse_runner_output(proc.stdout)


def _check(got: dict, want) -> None:
    assert got["token_ids"] == want.token_ids
    assert got["text"] == want.text
    assert got["stop_reason"] == want.stop_reason
    assert got["prompt_tokens"] == want.prompt_len
    assert got["views"] == want.timings["views"]


@pytest.mark.parametrize("image", [c[0] for c in CASES])
def test_native_runner_matches_python(native_runner, nano_export, requests, reference, image):
    got = _answer(native_runner, nano_export / "program.pte", requests[image])
    _check(got, reference[image])
    assert got["stages"]["ttft"] > 0 and got["load_s"] > 0 and got["peak_rss_mib"] > 0


def test_native_runner_stops_at_the_token_budget(native_runner, nano_export, requests, reference):
    got = _answer(native_runner, nano_export / "program.pte", requests[CASES[-1][0]], "--max-new-tokens", 2,
                  "--threads", 1)
    _check(got, reference["length"])
    assert got["stop_reason"] == "length" and got["threads"] == 1


@pytest.mark.parametrize("image", [c[0] for c in CASES])
def test_aarch64_runner_under_qemu_matches_python(aarch64_runner, nano_export, requests, reference, image):
    _check(_answer(aarch64_runner, nano_export / "program.pte", requests[image]), reference[image])


def test_detokenizer_matches_sentencepiece(native_runner, nano_export, requests):
    """Random ids (byte pieces, controls, <unk>, out-of-range ids, "▁" at the start) and text with
    byte-fallback characters decode as Tokenizer.decode does."""
    from sphinx_edge.tokenizer import Tokenizer

    tok = Tokenizer(nano_export / "tokenizer.model")
    rng = np.random.default_rng(0)
    special = [0, 1, 2, 3, 4, 200, 0xC3 + 4, 0xA9 + 4, 259, 264, 268, 274]  # 4 + b: the byte piece <0xb>
    sequences = [[int(rng.choice(special)) if rng.random() < 0.5 else int(rng.integers(0, tok.vocab_size + 5))
                  for _ in range(rng.integers(1, 8))] for _ in range(60)]
    sequences += [tok.encode(t) for t in ("héllo wörld 👋", " leading space", "€", "\n### Human")]
    sequences += [tok.encode("é")[:-1], [4 + 0xE2, 4 + 0x82], [4 + 0xA9, 4 + 0xC3]]  # cut or invalid UTF-8
    for ids in sequences:
        out = _run(native_runner, "--detokenize", requests["text-only"], *ids).stdout
        assert json.loads(out.removeprefix("SPHINX_TEXT ")) == tok.decode(ids), ids


def test_runner_errors_are_specific(native_runner, nano_export, requests, tmp_path):
    program, good = nano_export / "program.pte", requests["shapes_2x1.png"]
    blob = good.read_bytes()
    bad = {
        "truncated": blob[:-1000],
        "notrequest": b"hello world, not a request",
        "othermodel": blob.replace(f'"tile_size":{TILE}'.encode(), b'"tile_size":256', 1),
        "othershape": blob.replace(f'"shape":[3,{ROWS},{TILE}]'.encode(), f'"shape":[3,{TILE},{ROWS}]'.encode(), 1),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    expected = [
        ((tmp_path / "none.pte", good), "cannot open the program"),
        ((program, tmp_path / "none.bin"), "cannot open the request file"),
        ((program, tmp_path / "truncated"), "is truncated"),
        ((program, tmp_path / "notrequest"), "is not a sphinx-edge request file"),
        ((program, tmp_path / "othermodel"), f"expects tile_size = 256, the program has {TILE}"),
        ((program, tmp_path / "othershape"),
         f"shape [3, {TILE}, {ROWS}]; the program's vision_encoder takes [3, {ROWS}, {TILE}]"),
        ((good, good), "could not load the program"),
    ]
    for args, message in expected:
        proc = _run(native_runner, *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-500:])
        with pytest.raises(RunnerOutputError, match="sphinx_runner failed"):
            parse_runner_output(proc.stdout + proc.stderr)


def test_request_file_is_written_torch_free(nano_export, tmp_path):
    out = tmp_path / "req.bin"
    proc = run_torch_free(f"""
        from sphinx_edge.runtime.request import write_request
        write_request({str(nano_export)!r}, {str(ASSETS / 'shapes_2x1.png')!r}, "What colour is the circle?",
                      {str(out)!r}, max_new_tokens=8)
    """)
    assert proc.returncode == 0, proc.stderr
    header = read_request_header(out)
    blob = out.read_bytes()
    assert blob.startswith(MAGIC) and header["data_offset"] % ALIGN == 0
    assert len(blob) == header["data_offset"] + header["data_bytes"]
    images = [s["image"] for s in header["segments"] if "image" in s]
    assert [i["shape"] for i in images] == [[3, ROWS, TILE]] * 3 and images[1]["offset"] == 3 * ROWS * TILE * 4
    assert header["segments"][-1]["tokens"][:2] == [header["program"]["skip_id"]] * 2  # the padded tiles
    assert header["max_new_tokens"] == 8 and header["stop_strings"] == ["\n###"]
    manifest = json.loads((nano_export / "manifest.json").read_text())  # the key Pipeline(.., "pte") uses
    layout = manifest["model"]["config"]["layout"]
    key = image_key(export_key(manifest, ["program.pte"]), ASSETS / "shapes_2x1.png", layout)
    assert header["image_cache"] == {"key": key, "shape": [IMAGE_TOKENS_2X1, 256]}
    vocab = header["vocab"]
    assert len(vocab["pieces"]) == len(vocab["kinds"]) and vocab["kinds"].count("b") == 256  # byte fallback


# -- the image cache (--cache-dir) ------------------------------------------------------------

CACHED = CASES[1]  # shapes_2x1.png: its image part holds skip embeddings between and after the views


def _cached_run(runner: list[str], export: Path, request: Path, cache: Path, *args) -> tuple[dict, bool, str]:
    """The parsed answer, whether the image came from the cache, and stderr less ExecuTorch's log."""
    proc = _run(runner, export / "program.pte", request, "--cache-dir", cache, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stat = [line for line in proc.stdout.splitlines() if line.startswith("SPHINX_STAT ")][-1]
    cached = dict(f.split("=", 1) for f in stat.split()[1:])["image_cached"]
    notes = "".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith("sphinx_runner"))
    return parse_runner_output(proc.stdout), cached == "1", notes


def _entry(request: Path) -> str:
    return read_request_header(request)["image_cache"]["key"] + ".img"


def _read_entry(path: Path) -> tuple[dict, np.ndarray]:
    raw = path.read_bytes()
    assert raw.startswith(IMAGE_MAGIC)
    size = int.from_bytes(raw[len(IMAGE_MAGIC):len(IMAGE_MAGIC) + 4], "little")
    header = json.loads(raw[len(IMAGE_MAGIC) + 4:len(IMAGE_MAGIC) + 4 + size])
    return header, np.frombuffer(raw[len(IMAGE_MAGIC) + 4 + size:], np.float32).reshape(header["shape"])


def test_sha256_matches_hashlib(native_runner, tmp_path):
    import hashlib

    rng = np.random.default_rng(0)
    files = []  # every padding case: empty, around one block's 55/56/64 bytes, several blocks
    for n in (0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, (1 << 20) + 7):
        files.append(tmp_path / f"f{n}")
        files[-1].write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    out = _run(native_runner, "--sha256", *files).stdout.split()
    assert out == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_runner_keeps_the_encoded_image(native_runner, nano_export, requests, reference, tmp_path):
    image, request = CACHED[0], requests[CACHED[0]]
    first, cached, notes = _cached_run(native_runner, nano_export, request, tmp_path)
    _check(first, reference[image])
    entry = tmp_path / _entry(request)
    assert not cached and notes == ""
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # and no temporary file left
    header, embeds = _read_entry(entry)
    assert header["shape"] == [reference[image].image_tokens, 256] and header["info"] == {"views": 3.0}
    assert ImageCache(tmp_path).get(entry.stem)[1] == {"views": 3.0}  # Python reads it

    os.utime(entry, (1, 1))
    second, cached, notes = _cached_run(native_runner, nano_export, request, tmp_path)
    assert cached and notes == "" and second["stages"]["vision"] == 0
    _check(second, reference[image])
    assert second["token_ids"] == first["token_ids"] and entry.stat().st_mtime > 1  # used: most recent


def test_python_and_cpp_read_each_others_entries(native_runner, nano_export, requests, reference, tmp_path):
    from sphinx_edge.runtime.pipeline import Pipeline

    image, question = CACHED
    by_python, by_cpp = tmp_path / "python", tmp_path / "cpp"
    Pipeline(nano_export, "pte", cache_dir=by_python).answer(question, ASSETS / image, max_new_tokens=MAX_NEW)
    got, cached, _ = _cached_run(native_runner, nano_export, requests[image], by_python)
    assert cached
    _check(got, reference[image])

    assert not _cached_run(native_runner, nano_export, requests[image], by_cpp)[1]
    pipeline = Pipeline(nano_export, "pte", cache_dir=by_cpp)
    answer = pipeline.answer(question, ASSETS / image, max_new_tokens=MAX_NEW)
    assert answer.timings.get("image_cached") == 1.0 and pipeline.image_cache.refused == []
    assert answer.token_ids == reference[image].token_ids
    (ph, pe), (ch, ce) = (_read_entry(d / _entry(requests[image])) for d in (by_python, by_cpp))
    assert {k: v for k, v in ph.items() if k != "sha256"} == {k: v for k, v in ch.items() if k != "sha256"}
    np.testing.assert_allclose(ce, pe, rtol=1e-5, atol=1e-5)  # the same encoder, up to thread timing


def _corrupt(entry: Path, how: str) -> None:
    raw = bytearray(entry.read_bytes())
    if how == "flipped":
        raw[-100] ^= 0x40
    elif how == "truncated":
        del raw[-1000:]
    elif how == "magic":
        raw[:4] = b"JUNK"
    else:  # a sound entry of another shape (the same bytes as [dim, tokens])
        header, embeds = _read_entry(entry)
        ImageCache(entry.parent).put(entry.stem, embeds.reshape(embeds.shape[::-1]), header["info"])
        return
    entry.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, why", [("flipped", "its checksum does not match"), ("truncated", "cut short"),
                                      ("magic", "not a sphinx-edge image cache entry"),
                                      ("shape", f"its shape is not the [{IMAGE_TOKENS_2X1}, 256] this request needs")])
def test_corrupt_cache_entries_are_refused_removed_and_recomputed(native_runner, nano_export, requests,
                                                                  reference, tmp_path, how, why):
    image, request = CACHED[0], requests[CACHED[0]]
    _cached_run(native_runner, nano_export, request, tmp_path)
    entry = tmp_path / _entry(request)
    good_header, good_embeds = _read_entry(entry)
    _corrupt(entry, how)
    got, cached, notes = _cached_run(native_runner, nano_export, request, tmp_path)
    assert not cached and notes.count("\n") == 1, notes  # one line says so
    assert f"refused the cached image {entry} ({why}" in notes, notes
    _check(got, reference[image])
    header, embeds = _read_entry(entry)  # encoded again and written afresh
    assert header["shape"] == good_header["shape"] and header["info"] == good_header["info"]
    np.testing.assert_allclose(embeds, good_embeds, rtol=1e-5, atol=1e-5)


def test_cache_folder_is_bounded_least_recently_used_first(native_runner, nano_export, requests, tmp_path):
    old, older, other = tmp_path / ("a" * 64 + ".img"), tmp_path / ("b" * 64 + ".img"), tmp_path / "notes.txt"
    for path, size, mtime in ((older, 700_000, 1000), (old, 300_000, 2000), (other, 900_000, 1000)):
        path.write_bytes(bytes(size))
        os.utime(path, (mtime, mtime))
    _cached_run(native_runner, nano_export, requests[CACHED[0]], tmp_path, "--cache-mb", 1)
    # 700 kB + 300 kB + the new 60 kB entry pass 1 MiB: the least recently used goes, the rest fit.
    kept = sorted([old.name, other.name, _entry(requests[CACHED[0]])])
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_runner_without_a_cache_key_or_folder_does_not_cache(native_runner, nano_export, requests, reference,
                                                             tmp_path):
    from sphinx_edge.runtime.pipeline import Pipeline

    image = CACHED[0]
    header, segments = decode_request(requests[image].read_bytes())
    old = tmp_path / "old.bin"  # as a request written before the image cache: no image_cache field
    old.write_bytes(encode_request(Pipeline(nano_export, backend=None), segments, header["max_new_tokens"]))
    cache = tmp_path / "cache"
    for _ in range(2):
        got, cached, notes = _cached_run(native_runner, nano_export, old, cache)
        assert not cached and "names no image cache key" in notes
        _check(got, reference[image])
    got, cached, notes = _cached_run(native_runner, nano_export, requests["text-only"], cache)
    assert not cached and notes == ""  # text only: nothing to cache, nothing to say
    assert not cache.exists() or not any(cache.iterdir())

    proc = _run(native_runner, nano_export / "program.pte", requests[image])  # no --cache-dir: as before
    assert proc.returncode == 0 and "image_cached=0" in proc.stdout
    _check(parse_runner_output(proc.stdout), reference[image])
