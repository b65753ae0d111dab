"""The MatMul benchmark: its four graphs, for either layer's shape, compute the same product."""

import numpy as np
import onnxruntime as ort
import pytest

from sphinx_edge.benchmarks.int8_matmul import KINDS, LAYERS, graph


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_graph_computes_the_same_matmul(layer):
    m, k, n = LAYERS[layer]
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32)
    want = a @ weight
    bounds = {"fp32": 0.99999, "dynamic": 0.999, "static": 0.999, "int4": 0.99}  # int4: 16 levels per block of 32
    for kind in KINDS:
        got = ort.InferenceSession(graph(kind, weight, float(np.abs(a).max() / 127), m)).run(None, {"a": a})[0]
        assert got.shape == (m, n)
        cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cosine > bounds[kind], (kind, cosine)
