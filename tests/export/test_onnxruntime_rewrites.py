"""ConvNeXt's MLPs a few rows at a time: the same numbers, one copy of each weight in the graph."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from sphinx_edge.config import get_config
from sphinx_edge.export.onnxruntime_rewrites import RowChunkedMlp, chunk_convnext_mlps
from sphinx_edge.model.convnext import ConvNeXt
from sphinx_edge.model.mlp import Mlp


def _mlp(dim: int = 8, hidden: int = 32) -> Mlp:
    torch.manual_seed(0)
    return Mlp(dim, hidden).eval()


def test_rows_at_a_time_equal_the_whole_map():
    mlp = _mlp()
    x = torch.randn(2, 7, 5, 8)
    chunked = RowChunkedMlp(mlp, chunk_positions=2 * 5, whole_bytes=0)  # 2 rows a chunk: 4 chunks
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), mlp(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("whole_bytes, matmuls", [(0, 8), (7 * 5 * 32 * 4, 2)])
def test_the_graph_has_a_matmul_pair_per_chunk_over_one_copy_of_the_weights(tmp_path, whole_bytes, matmuls):
    """4 chunks of 2, 2, 2 and 1 rows; a map at or under `whole_bytes` runs whole. Checked against
    onnxruntime with a dynamic batch, as the vision encoder is exported."""
    mlp = RowChunkedMlp(_mlp(), chunk_positions=2 * 5, whole_bytes=whole_bytes)
    x = torch.randn(3, 7, 5, 8)
    path = tmp_path / "mlp.onnx"
    with torch.no_grad():
        torch.onnx.export(mlp, (x,), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: Dim("views", min=1, max=8)},))
        want = mlp(x).numpy()
    graph = onnx.load(path).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["MatMul"] == matmuls
    weights = [t for t in graph.initializer if len(t.dims) == 2]
    assert sorted(tuple(t.dims) for t in weights) == [(8, 32), (32, 8)]  # each weight once, transposed
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_every_convnext_block_is_wrapped_once():
    convnext = ConvNeXt(get_config("test-tiny").convnext)
    blocks = sum(len(stage.blocks) for stage in convnext.stages)
    assert chunk_convnext_mlps(convnext) == blocks
    assert chunk_convnext_mlps(convnext) == 0
    assert all(isinstance(b.mlp, RowChunkedMlp) for stage in convnext.stages for b in stage.blocks)
