"""The C++ runner (runtime/cpp): the greedy tokens and text of the Python ExecuTorch pipeline, built
for this machine and cross-built for aarch64 (run under qemu-user), on the SPHINX-Nano int4 export.

Builds go through runtime/cpp/build.sh into build/cpp-<arch> (incremental). The export is conftest's
`nano_int4_pte`, made once per session.
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
from sphinx_edge.runtime.request import ALIGN, MAGIC, read_request_header, write_request

ROOT = Path(__file__).resolve().parents[2]
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
        "othermodel": blob.replace(b'"tile_size":128', b'"tile_size":256', 1),
        "othershape": blob.replace(b'"shape":[3,184,128]', b'"shape":[3,128,184]', 1),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    expected = [
        ((tmp_path / "none.pte", good), "cannot open the program"),
        ((program, tmp_path / "none.bin"), "cannot open the request file"),
        ((program, tmp_path / "truncated"), "is truncated"),
        ((program, tmp_path / "notrequest"), "is not a sphinx-edge request file"),
        ((program, tmp_path / "othermodel"), "expects tile_size = 256, the program has 128"),
        ((program, tmp_path / "othershape"),
         "shape [3, 128, 184]; the program's vision_encoder takes [3, 184, 128]"),
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
    assert [i["shape"] for i in images] == [[3, 184, 128]] * 3 and images[1]["offset"] == 3 * 184 * 128 * 4
    assert header["segments"][-1]["tokens"][:2] == [header["program"]["skip_id"]] * 2  # the padded tiles
    assert header["max_new_tokens"] == 8 and header["stop_strings"] == ["\n###"]
    vocab = header["vocab"]
    assert len(vocab["pieces"]) == len(vocab["kinds"]) and vocab["kinds"].count("b") == 256  # byte fallback
