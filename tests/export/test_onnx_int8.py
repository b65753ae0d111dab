"""The streamed int8 quantizer against onnxruntime's `quantize_dynamic` on the same graph."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sphinx_edge.export.onnx_int8 import ALIGN, matmul_weights, quantize_matmuls_int8

K, N = 64, 96


def write_graph(path: Path) -> None:
    """x -> MatMul(w_q) and MatMul(w_k) (one shared activation), relu, MatMul(w_o) + bias; `shared`
    feeds both a MatMul and an Add, so it must stay fp32. Weights in external data."""
    rng = np.random.default_rng(0)
    weights = {
        "w_q": rng.normal(size=(K, N)).astype(np.float32),
        "w_k": rng.normal(size=(K, N)).astype(np.float32) * 0.1,
        "w_o": rng.normal(size=(N, K)).astype(np.float32),
        "shared": rng.normal(size=(K, K)).astype(np.float32),
        "bias": rng.normal(size=(K,)).astype(np.float32),
        "table": rng.normal(size=(K, K)).astype(np.float32),
    }
    weights["w_q"][:, 3] = 0  # an all-zero column: scale must not be 0
    nodes = [
        helper.make_node("MatMul", ["x", "w_q"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "w_k"], ["k"], name="k_proj"),
        helper.make_node("Add", ["q", "k"], ["qk"]),
        helper.make_node("Relu", ["qk"], ["h"]),
        helper.make_node("MatMul", ["h", "w_o"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bias"], ["ob"]),
        helper.make_node("MatMul", ["ob", "shared"], ["s0"]),
        helper.make_node("Transpose", ["table"], ["table_t"]),
        helper.make_node("MatMul", ["s0", "table_t"], ["s1"]),
        helper.make_node("MatMul", ["s1", "table"], ["s"]),
        helper.make_node("MatMul", ["s", "shared"], ["t"]),
        helper.make_node("Add", ["t", "bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", K])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def graph(tmp_path) -> Path:
    write_graph(tmp_path / "fp32.onnx")
    return tmp_path / "fp32.onnx"


def test_matches_onnxruntime_quantize_dynamic(graph, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ours = tmp_path / "ours" / "int8.onnx"
    ours.parent.mkdir()
    assert quantize_matmuls_int8(graph, ours) == [ours, ours.with_name("int8.onnx.data")]
    quantize_dynamic(graph, tmp_path / "ort.onnx", weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])
    x = np.random.default_rng(1).normal(size=(2, 5, K)).astype(np.float32)
    fp32, reference, got = run(graph, x), run(tmp_path / "ort.onnx", x), run(ours, x)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= 1e-5 * scale  # the same arithmetic (float rounding aside)
    cosine = (got * fp32).sum() / np.linalg.norm(got) / np.linalg.norm(fp32)
    assert cosine > 0.999

    model = onnx.load(ours, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 6 and ops.count("DynamicQuantizeLinear") == 5  # x is quantized once
    assert ops.count("MatMul") == 1  # on table's transpose, a computed tensor
    assert {"table", "table_quantized"} <= {t.name for t in model.graph.initializer}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            offset = int({e.key: e.value for e in t.external_data}["offset"])
            assert offset % ALIGN == 0


def test_float_matrices_used_as_matmul_weights_are_chosen(graph):
    assert matmul_weights(onnx.load(graph, load_external_data=False).graph) == {"w_q", "w_k", "w_o", "shared", "table"}


def test_a_truncated_data_file_fails_and_writes_nothing(graph, tmp_path):
    data = graph.with_name(graph.name + ".data")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError):
        quantize_matmuls_int8(graph, out / "int8.onnx")
    assert list(out.iterdir()) == []
