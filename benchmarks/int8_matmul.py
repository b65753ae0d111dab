"""Does static int8 make onnxruntime's vision MatMuls faster than dynamic int8? One MatMul, three ways.

    python -m sphinx_edge.benchmarks.int8_matmul [--threads 2] [--repeat 10]

The shape is a ConvNeXt-XXL stage-3 MLP layer of a 512-px view (1024 tokens x 1536 -> 6144), where
SPHINX-Tiny's vision encoder spends most of its time. The weights are int8 per column in both int8
graphs; they differ only in how the activations get their scale: `DynamicQuantizeLinear` (computed
per call, what our exports use) or a fixed, calibrated `QuantizeLinear` (static, QDQ). onnxruntime
fuses both into the same integer GEMM, so a gap here is the whole of what static quantization could
buy on this CPU (benchmarks/RESULTS.md, "Faster vision").
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import typer

SHAPE = (1024, 1536, 6144)  # tokens, in, out


def graph(kind: str, weight: np.ndarray, activation_scale: float) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = SHAPE[0], *weight.shape
    scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    initializers = {"w": weight, "w_q": np.round(weight / scale).astype(np.int8), "w_scale": scale,
                    "w_zero": np.zeros(n, np.int8), "a_scale": np.array(activation_scale, np.float32),
                    "a_zero": np.array(128, np.uint8)}
    if kind == "fp32":
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"])]
    else:
        if kind == "dynamic":
            quantize = helper.make_node("DynamicQuantizeLinear", ["a"], ["a_q", "a_s", "a_z"])
        else:
            quantize = helper.make_node("QuantizeLinear", ["a", "a_scale", "a_zero"], ["a_q"])
        a_scale, a_zero = ("a_s", "a_z") if kind == "dynamic" else ("a_scale", "a_zero")
        nodes = [quantize,
                 helper.make_node("MatMulInteger", ["a_q", "w_q", a_zero, "w_zero"], ["y_int"]),
                 helper.make_node("Cast", ["y_int"], ["y_float"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", [a_scale, "w_scale"], ["scales"]),
                 helper.make_node("Mul", ["y_float", "scales"], ["y"])]
    used = {name for node in nodes for name in node.input}
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(v, name) for name, v in initializers.items() if name in used])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def main(threads: int = typer.Option(2, help="onnxruntime intra-op threads"),
         repeat: int = typer.Option(10, help="timed calls per graph, per round"),
         rounds: int = typer.Option(2, help="rounds; the graphs alternate within each")) -> None:
    """Times fp32, dynamic int8 and static int8 MatMuls of one shape, side by side."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    m, k, n = SHAPE
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    kinds = ("fp32", "dynamic", "static")
    sessions = {kind: ort.InferenceSession(graph(kind, weight, float(np.abs(a).max() / 127)), options,
                                           providers=["CPUExecutionProvider"]) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, session in sessions.items():
            session.run(None, {"a": a})
            for _ in range(repeat):
                start = time.perf_counter()
                session.run(None, {"a": a})
                times[kind].append(time.perf_counter() - start)
    print(f"MatMul {m} x {k} -> {n}, {threads} threads, {rounds} x {repeat} calls each")
    print("| activations | median ms | range ms | GMAC/s | vs dynamic |")
    print("|---|---|---|---|---|")
    dynamic = statistics.median(times["dynamic"])
    for kind in kinds:
        t = statistics.median(times[kind])
        print(f"| {kind} | {1e3 * t:.1f} | {1e3 * min(times[kind]):.1f}-{1e3 * max(times[kind]):.1f} | "
              f"{m * k * n / t / 1e9:.0f} | {t / dynamic:.2f}x |")


if __name__ == "__main__":
    typer.run(main)
