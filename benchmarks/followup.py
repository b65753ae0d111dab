"""Time to first token of a first question about an image and of a follow-up question about the same
image in a new conversation (the image cache and the KV-cache prefix reused), each repetition on a
fresh pipeline. Until `bench` reports it (issue 17), run as:

    python -m sphinx_edge.benchmarks.followup EXPORT_DIR [onnx|pte] [THREADS] [IMAGE]

Prints one line per repetition and a JSON summary (medians, ratio, this process's peak RSS).
"""

from __future__ import annotations

import json
import statistics
import sys

from sphinx_edge.rss import peak_rss_mib
from sphinx_edge.bundled import SAMPLES
from sphinx_edge.runtime.pipeline import Answer, Pipeline

FIRST, FOLLOW_UP = "What is in the image?", "What colour is the largest shape?"


def ttft(answer: Answer) -> float:
    return sum(answer.timings.get(k, 0.0) for k in ("preprocess", "vision", "prefill"))


def main(export_dir: str, fmt: str = "onnx", threads: int = 2, image: str = str(SAMPLES / "wide_2x1.png"),
         repeats: int = 3) -> dict:
    first, follow = [], []
    for rep in range(repeats):
        pipeline = Pipeline(export_dir, fmt, threads=threads)
        a, b = (pipeline.answer(q, image, max_new_tokens=1) for q in (FIRST, FOLLOW_UP))
        first.append(ttft(a))
        follow.append(ttft(b))
        print(f"{rep}: first {first[-1]:.2f} s ({a.prefilled} tokens prefilled), follow-up {follow[-1]:.3f} s "
              f"({b.prefilled} prefilled)", flush=True)
        del pipeline
    return {"export": export_dir, "format": fmt, "threads": threads, "image": image,
            "first_ttft_s": first, "followup_ttft_s": follow, "median_first_s": statistics.median(first),
            "median_followup_s": statistics.median(follow),
            "ratio": statistics.median(follow) / statistics.median(first), "peak_rss_mib": peak_rss_mib()}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], *(args[1:2] or ["onnx"]), *[int(a) for a in args[2:3]], *args[3:4])))
