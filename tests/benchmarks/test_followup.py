"""benchmarks/followup.py: a follow-up question about the same image reuses the image and its prefix."""

from sphinx_edge.benchmarks.followup import main
from sphinx_edge.bundled import NANO_EXPORT


def test_a_follow_up_prefills_only_its_text_and_is_faster():
    result = main(str(NANO_EXPORT), "onnx", threads=1, repeats=1)
    assert len(result["first_ttft_s"]) == len(result["followup_ttft_s"]) == 1
    assert result["ratio"] < 1 and result["peak_rss_mib"] > 0
