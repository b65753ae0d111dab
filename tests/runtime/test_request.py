"""Request files: the writer/reader round trip (hypothesis), and the C++ reader under libFuzzer with
AddressSanitizer + UBSan, seeded with real requests (runtime/cpp/fuzz)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import missing_tool
from sphinx_edge.bundled import SAMPLES
from sphinx_edge.runtime.multimodal_inputs import Segment
from sphinx_edge.runtime.pipeline import Pipeline
from sphinx_edge.runtime.request import decode_request, encode_request, write_request

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "runtime" / "cpp" / "fuzz"
FUZZ_SECONDS = int(os.environ.get("SPHINX_EDGE_FUZZ_SECONDS", "60"))


def _segments(vocab_size: int):
    tokens = st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=20).map(lambda t: Segment(tokens=tuple(t)))
    images = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1)).map(
        lambda s: Segment(image=np.random.default_rng(s[3]).standard_normal(s[:3]).astype(np.float32)))
    return st.lists(st.one_of(tokens, images), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_request_round_trip(onnx_export, data):
    _, out, _ = onnx_export
    pipeline = Pipeline(out, backend=None)
    segments = data.draw(_segments(pipeline.config.llm.vocab_size + pipeline.config.n_special_tokens))
    max_new = data.draw(st.integers(1, 1000))
    blob = encode_request(pipeline, segments, max_new)
    header, back = decode_request(blob)
    assert header["max_new_tokens"] == max_new and len(back) == len(segments)
    for a, b in zip(segments, back):
        assert a.kind == b.kind and a.tokens == b.tokens
        if a.kind == "image":
            assert np.array_equal(a.image, b.image)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=8))
def test_damaged_requests_are_refused_with_value_errors(onnx_export, cut, flips):
    _, out, _ = onnx_export
    pipeline = Pipeline(out, backend=None)
    blob = bytearray(encode_request(pipeline, [Segment(tokens=(1, 2, 3)), Segment(image=np.ones((3, 4, 4), np.float32))], 8))
    for at, mask in flips:
        blob[at % len(blob)] ^= mask
    try:
        decode_request(bytes(blob[: len(blob) - cut % len(blob)]))
    except ValueError:
        pass


@pytest.fixture(scope="module")
def fuzz_seeds(onnx_export, tmp_path_factory) -> Path:
    """Real requests (square, 2:1 with skip tokens, text only) to start the fuzzer from."""
    _, out, _ = onnx_export
    d = tmp_path_factory.mktemp("fuzz-seeds")
    for image in ("square.png", "wide_2x1.png", None):
        write_request(out, SAMPLES / image if image else None, "What is it?", d / f"{image or 'text'}.bin",
                      max_new_tokens=8)
    return d


def test_the_request_reader_survives_libfuzzer(fuzz_seeds):
    if shutil.which("clang++") is None and shutil.which("clang++-14") is None:
        missing_tool("clang++ is not installed (clang, libclang-rt-14-dev): run runtime/cpp/install-deps.sh")
    proc = subprocess.run(["bash", str(FUZZ / "fuzz.sh"), str(FUZZ_SECONDS), str(fuzz_seeds)], capture_output=True,
                          text=True, timeout=FUZZ_SECONDS + 600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the fuzzer found a crash (its input is in build/fuzz/crash-*):\n{log[-4000:]}"
    runs = int(log.split("stat::number_of_executed_units:")[1].split()[0])
    seconds = int(log.split(f"Done {runs} runs in ")[1].split()[0])
    assert runs > 1000 and seconds >= FUZZ_SECONDS, log[-2000:]
