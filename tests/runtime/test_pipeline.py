"""The runtime: same greedy tokens as torch on both backends, torch-free ONNX path, cache reuse in chat."""


import numpy as np
import pytest

from conftest import make_image, run_torch_free
from sphinx_edge.prompt import format_prompt
from sphinx_edge.runtime import pipeline as pipeline_module
from sphinx_edge.bundled import SAMPLES
from sphinx_edge.generate import generate
from sphinx_edge.prompt import ContextOverflowError
from sphinx_edge.runtime.pipeline import Chat, Pipeline
from sphinx_edge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "wide.png"
    make_image(90, 40, seed=3).save(path)
    return path


@pytest.mark.parametrize("backend", ["onnx", "pte"])
def test_greedy_answer_matches_torch(backend, onnx_export, pte_export, tokenizer_file, image):
    model, out, _ = onnx_export if backend == "onnx" else pte_export
    want = generate(model, Tokenizer(tokenizer_file), "Describe the picture.", image, max_new_tokens=12)
    got = Pipeline(out, backend).answer("Describe the picture.", image, max_new_tokens=12)
    assert want.token_ids, "the reference answered nothing: the comparison would be empty"
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.prompt_len == want.prompt_len and got.image_tokens == want.image_tokens


def test_pte_path_loads_only_executorchs_runtime(pte_export, image):
    """The pte backend answers without ExecuTorch's compiler stack (exir, torch._dynamo: seconds of
    imports) and without the threadpool's CPU-probing lines on the console."""
    import subprocess
    import sys

    _, out, _ = pte_export
    script = f"""
import sys
from sphinx_edge.runtime.pipeline import Pipeline
answer = Pipeline({str(out)!r}, "pte", threads=2).answer("Describe the picture.", {str(image)!r}, max_new_tokens=4)
heavy = [m for m in ("torch._dynamo", "torch._inductor", "executorch.exir.capture", "executorch.exir") if m in sys.modules]
print(len(answer.token_ids), heavy)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split(maxsplit=1)[1].strip() == "[]", result.stdout
    assert "cpuinfo" not in result.stderr + result.stdout and "threadpool" not in result.stderr + result.stdout


def test_onnx_path_runs_without_torch(onnx_export, image):
    _, out, _ = onnx_export
    result = run_torch_free(f"""
        from sphinx_edge.runtime.pipeline import Pipeline
        answer = Pipeline({str(out)!r}).answer("Describe the picture.", {str(image)!r}, max_new_tokens=4)
        print(len(answer.token_ids), answer.image_tokens)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] != "0"


@pytest.mark.parametrize("backend", ["onnx", "pte"])
def test_second_turn_prefills_only_new_tokens(backend, onnx_export, pte_export, tokenizer_file, image):
    model, out, _ = onnx_export if backend == "onnx" else pte_export
    chat = Chat(Pipeline(out, backend), image)
    first = chat.ask("What is in the picture?", max_new_tokens=6)
    second = chat.ask("And the colours?", max_new_tokens=6)
    assert first.prefilled == first.prompt_len
    assert second.prefilled < second.prompt_len - first.prompt_len + len(first.token_ids) + 2
    assert "vision" not in second.timings  # the image is encoded once
    # The reused cache gives what a fresh run over the whole conversation gives.
    fresh = generate(model, Tokenizer(tokenizer_file), list(chat.turns[:1]) + [("And the colours?", None)], image,
                     max_new_tokens=6)
    assert second.token_ids == fresh.token_ids


def test_prompt_overflow_is_refused(onnx_export, image):
    _, out, _ = onnx_export
    with pytest.raises(ContextOverflowError, match="the context holds 512"):
        Pipeline(out).answer("tell me " * 400, image)


def test_chat_drops_the_oldest_turns_when_the_history_no_longer_fits(onnx_export):
    """The image and BOS stay in the cache; only the text after them is prefilled again."""
    _, out, _ = onnx_export
    chat = Chat(Pipeline(out), SAMPLES / "wide_2x1.png")
    dropped, answers = 0, []
    for i in range(40):
        answers.append(chat.ask(f"Question number {i}: what is in the picture, in a few words?", max_new_tokens=4))
        dropped += answers[-1].dropped_turns
    assert dropped > 0 and all(a.prompt_len < 512 for a in answers)
    first_drop = next(a for a in answers if a.dropped_turns)
    assert first_drop.prefilled < first_drop.prompt_len - first_drop.image_tokens  # image kept in the cache
    assert chat.turns[-1][0].startswith("Question number 39")


@pytest.mark.parametrize("backend", ["onnx", "pte"])
def test_chunked_streamed_and_pipelined_prefills_equal_one_call(backend, onnx_export, pte_export, image, monkeypatch):
    """The prefill in chunks, views streamed from the encoder (in a worker thread, pipelined) gives
    the logits and the greedy tokens of one prefill call over the whole sequence."""
    _, out, _ = onnx_export if backend == "onnx" else pte_export
    sequential, pipelined = Pipeline(out, backend), Pipeline(out, backend, pipelined=True)
    ids = sequential.tokenizer.encode(format_prompt([("Describe the picture.", None)]), bos=True)
    embeds, _ = sequential.encode_image(image)
    monkeypatch.setattr(pipeline_module, "PREFILL_CHUNK", 10**6)
    whole = sequential.prefill(ids, embeds)
    reference = sequential.answer("Describe the picture.", image, max_new_tokens=10).token_ids
    monkeypatch.setattr(pipeline_module, "PREFILL_CHUNK", 7)  # chunks that cut through views and text
    assert len(ids) + len(embeds) > 3 * 7
    np.testing.assert_allclose(sequential.prefill(ids, embeds), whole, atol=1e-4)
    np.testing.assert_allclose(sequential.prefill(ids, sequential.image_stream(image)), whole, atol=1e-4)
    np.testing.assert_allclose(pipelined.prefill(ids, pipelined.image_stream(image)), whole, atol=1e-4)
    for p in (Pipeline(out, backend), Pipeline(out, backend, pipelined=True)):
        answer = p.answer("Describe the picture.", image, max_new_tokens=10)
        assert answer.token_ids == reference
        assert answer.timings["vision"] > 0 and answer.timings["ttft"] >= answer.timings["prefill"]


@pytest.mark.parametrize("max_views", [1, 2])
def test_a_view_budget_answers_as_torch_with_the_same_budget(max_views, onnx_export, tokenizer_file, image):
    model, out, _ = onnx_export
    want = generate(model, Tokenizer(tokenizer_file), "Describe the picture.", image, max_new_tokens=8,
                    max_views=max_views)
    got = Pipeline(out, max_views=max_views).answer("Describe the picture.", image, max_new_tokens=8)
    full = Pipeline(out).answer("Describe the picture.", image, max_new_tokens=1)
    assert got.token_ids == want.token_ids and want.token_ids
    assert got.image_tokens == want.image_tokens < full.image_tokens
    assert got.timings["views"] == max_views


def test_a_view_budget_below_one_is_refused(onnx_export):
    with pytest.raises(ValueError, match="at least 1"):
        Pipeline(onnx_export[1], max_views=0)
