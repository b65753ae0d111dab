"""How fast does onnxruntime multiply with each of our weight formats? One MatMul, four ways.

    python -m sphinx_edge.benchmarks.int8_matmul [--layer vision|llm] [--threads 2] [--repeat 10]

`--layer vision` (the default) is a ConvNeXt-XXL stage-3 MLP layer of a 512-px view (1024 tokens x
1536 -> 6144), where SPHINX-Tiny's vision encoder spends most of its time; `--layer llm` is TinyLlama's
MLP up-projection over the 824 tokens of the 2:1 sample's prefill (824 x 2048 -> 5632). The int8
graphs hold int8 weights per column and differ only in how the activations get their scale:
`DynamicQuantizeLinear` (computed per call, what our exports use) or a fixed, calibrated
`QuantizeLinear` (static, QDQ); onnxruntime fuses both into the same integer GEMM, so their gap is the
whole of what static quantization could buy (benchmarks/RESULTS.md, "Faster vision"). The int4 graph
is what `export --quant int4` makes of an LLM MatMul (`MatMulNBits`, block 32, int8 compute): a
different kernel family, whose speed relative to the int8 GEMM depends on the CPU (on one with AMX,
onnxruntime's int8 GEMM uses it and `MatMulNBits` does not: RESULTS.md, "AMX").
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import typer

LAYERS: dict[str, tuple[int, int, int]] = {"vision": (1024, 1536, 6144), "llm": (824, 2048, 5632)}  # tokens, in, out
LABELS: dict[str, str] = {"fp32": "fp32", "dynamic": "int8, dynamic", "static": "int8, static (QDQ)",
                          "int4": "int4 (MatMulNBits)"}  # what each graph kind is, in the table
KINDS = tuple(LABELS)


def graph(kind: str, weight: np.ndarray, activation_scale: float, tokens: int) -> bytes:
    """One MatMul of `tokens` x weight as `kind` (KINDS) computes it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind == "int4":  # what `export --quant int4` makes of it
        from sphinx_edge.export.onnx import quantize_int4

        return quantize_int4(onnx.load_from_string(graph("fp32", weight, activation_scale, tokens))).SerializeToString()
    m, k, n = tokens, *weight.shape
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


def main(layer: str = typer.Option("vision", help="the MatMul's shape: vision (a ConvNeXt-XXL MLP layer of a "
                                   "512-px view) or llm (TinyLlama's MLP over an 824-token prefill)"),
         threads: int = typer.Option(2, help="onnxruntime intra-op threads"),
         repeat: int = typer.Option(10, help="timed calls per graph, per round"),
         rounds: int = typer.Option(2, help="rounds; the graphs alternate within each")) -> None:
    """Times fp32, dynamic int8, static int8 and int4 MatMuls of one shape, side by side."""
    import onnxruntime as ort

    if layer not in LAYERS:
        raise typer.BadParameter(f"choose one of {', '.join(LAYERS)}", param_hint="--layer")
    rng = np.random.default_rng(0)
    m, k, n = LAYERS[layer]
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    sessions = {kind: ort.InferenceSession(graph(kind, weight, float(np.abs(a).max() / 127), m), options,
                                           providers=["CPUExecutionProvider"]) for kind in KINDS}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind, session in sessions.items():
            session.run(None, {"a": a})
            for _ in range(repeat):
                start = time.perf_counter()
                session.run(None, {"a": a})
                times[kind].append(time.perf_counter() - start)
    print(f"MatMul {m} x {k} -> {n} ({layer}), {threads} threads, {rounds} x {repeat} calls each")
    print("| weights, activations | median ms | range ms | GMAC/s | vs dynamic |")
    print("|---|---|---|---|---|")
    dynamic = statistics.median(times["dynamic"])
    for kind in KINDS:
        t = statistics.median(times[kind])
        print(f"| {LABELS[kind]} | {1e3 * t:.1f} | {1e3 * min(times[kind]):.1f}-{1e3 * max(times[kind]):.1f} | "
              f"{m * k * n / t / 1e9:.0f} | {t / dynamic:.2f}x |")


if __name__ == "__main__":
    typer.run(main)
