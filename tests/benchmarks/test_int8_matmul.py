"""The static-vs-dynamic int8 MatMul benchmark: its three graphs compute the same product."""

import numpy as np
import onnxruntime as ort

from sphinx_edge.benchmarks.int8_matmul import SHAPE, graph


def test_the_three_graphs_compute_the_same_matmul():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal(SHAPE[1:]) * 0.02).astype(np.float32)
    a = rng.standard_normal((SHAPE[0], SHAPE[1])).astype(np.float32)
    want = a @ weight
    for kind in ("fp32", "dynamic", "static"):
        got = ort.InferenceSession(graph(kind, weight, float(np.abs(a).max() / 127))).run(None, {"a": a})[0]
        cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cosine > (0.99999 if kind == "fp32" else 0.999), (kind, cosine)
