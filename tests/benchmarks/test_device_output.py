"""Reading the C++ runner's output (benchmarks/device_output.py) from a recorded run."""

import pytest

from sphinx_edge.benchmarks.device_output import RunnerOutputError, parse_runner_output

# sphinx_runner on the nano int4 export, shapes_2x1.png, "What colour is the circle?" (x86_64, 2 threads),
# with ExecuTorch's log lines on stderr mixed in as `adb shell` delivers them.
RECORDED = """\
I 00:00:00.002982 executorch:cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.
yellow
SPHINX_TEXT "yellow"
SPHINX_TOKENS 422 3 263
SPHINX_STAT load_ms=31.394 vision_ms=14.649 views=3 prefill_ms=38.396 prefill_tokens=104 ttft_ms=53.046 \
decode_ms=6.725 decode_tokens=2 generated_tokens=3 stop=stop threads=2 peak_rss_kb=60800
"""


def test_recorded_output_gives_stages_in_seconds():
    out = parse_runner_output(RECORDED)
    assert out["text"] == "yellow" and out["token_ids"] == [422, 3, 263] and out["stop_reason"] == "stop"
    assert (out["views"], out["prompt_tokens"], out["decode_tokens"], out["threads"]) == (3, 104, 2, 2)
    s = out["stages"]
    assert s["vision"] == pytest.approx(0.014649) and s["vision_per_view"] == pytest.approx(0.014649 / 3)
    assert s["prefill_tok_s"] == pytest.approx(104 / 0.038396) and s["ttft"] == pytest.approx(0.053046)
    assert s["decode_tok_s"] == pytest.approx(2 / 0.006725) and s["e2e"] == pytest.approx(0.053046 + 0.006725)
    assert out["load_s"] == pytest.approx(0.031394) and out["peak_rss_mib"] == pytest.approx(60800 / 1024)


def test_answer_text_that_looks_like_a_tag_does_not_confuse_it():
    answer = 'SPHINX_STAT a\nb "q"\n'  # the free-text answer printed first
    text = answer + RECORDED.replace('SPHINX_TEXT "yellow"', 'SPHINX_TEXT "SPHINX_STAT a\\nb \\"q\\""')
    assert parse_runner_output(text)["text"] == 'SPHINX_STAT a\nb "q"'


def test_failed_run_reports_the_runners_error():
    with pytest.raises(RunnerOutputError, match="sphinx_runner failed: cannot open the program /x.pte"):
        parse_runner_output("sphinx_runner: error: cannot open the program /x.pte\n")
    with pytest.raises(RunnerOutputError, match="not the output of a finished sphinx_runner run"):
        parse_runner_output("yellow\n")
    with pytest.raises(RunnerOutputError, match="lacks 'views'"):
        parse_runner_output(RECORDED.replace(" views=3", ""))
