"""Dynamic int8 quantization of an ONNX graph's MatMul weights, streamed one weight at a time.

onnxruntime's `quantize_dynamic` loads the whole model and holds several copies of it: on
SPHINX-Tiny's 7.8 GB vision encoder it went past 24 GB. This writes the graph pattern
`quantize_dynamic(per_channel=True, weight_type=QInt8)` emits for a MatMul:

    DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q, A_zp, W_zp) -> Cast(float) -> Mul(A_scale * W_scale)

with W_q symmetric int8 per output column (zero point 0), but reads each weight from the source's
external-data file through a memory map and appends its int8 form to the new data file, so memory
stays near the largest single weight matrix. Every other initializer is copied as bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them


class _DataWriter:
    """Appends tensors to one external-data file and returns initializers that point into it."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, open(path, "wb")

    def close(self) -> None:
        self.file.close()

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        if array.nbytes < 1024:  # small tensors stay inside the graph file
            return numpy_helper.from_array(array, name)
        offset = self._pad()
        self.file.write(np.ascontiguousarray(array).tobytes())
        return self._external(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, offset, array.nbytes)

    def copy(self, tensor: TensorProto, base: Path) -> TensorProto:
        """`tensor` unchanged, its external bytes (if any) copied over in chunks."""
        if tensor.data_location != TensorProto.EXTERNAL:
            return tensor
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        start = self._pad()
        with open(base / info["location"], "rb") as src:
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(left, 64 << 20))
                if not chunk:
                    raise ValueError(f"{base / info['location']} ends inside tensor {tensor.name}")
                self.file.write(chunk)
                left -= len(chunk)
        return self._external(tensor.name, tensor.data_type, tensor.dims, start, length)

    def _pad(self) -> int:
        pos = self.file.tell()
        if pos % ALIGN:
            self.file.write(b"\0" * (ALIGN - pos % ALIGN))
        return self.file.tell()

    def _external(self, name: str, dtype: int, dims, offset: int, length: int) -> TensorProto:
        t = TensorProto(name=name, data_type=dtype, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        return t


def read_weight(tensor: TensorProto, base: Path) -> np.ndarray:
    """An initializer's values; external ones are memory-mapped, not read in."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return np.memmap(base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(tensor.dims) or (count,))


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of a [K, N] weight: (int8 values, float32 scales [N]), as onnxruntime does."""
    absmax = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return q, scale


def matmul_weights(graph: onnx.GraphProto) -> set[str]:
    """Names of float 2-D initializers used as a MatMul's right operand."""
    inits = {t.name: t for t in graph.initializer}
    names = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    return {name for name in names
            if name in inits and inits[name].data_type == TensorProto.FLOAT and len(inits[name].dims) == 2}


def _other_uses(graph: onnx.GraphProto) -> set[str]:
    """Tensors read by anything but a MatMul's right operand (graph outputs included)."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(name for i, name in enumerate(node.input) if not (node.op_type == "MatMul" and i == 1))
    return names


def quantize_matmuls_int8(src: Path, dst: Path) -> list[Path]:
    """The graph at `src` with its MatMul weights in int8 (see the module doc), written to `dst` and
    `dst.data`, both atomically; returns the files written."""
    src, dst = Path(src), Path(dst)
    model = onnx.load(src, load_external_data=False)
    graph, base = model.graph, src.parent
    weights, keep = matmul_weights(graph), _other_uses(graph)  # a weight also read elsewhere stays too
    data = dst.with_name(dst.name + ".data")
    tmp_data, tmp_graph = data.with_name(f".{data.name}.tmp"), dst.with_name(f".{dst.name}.tmp")
    writer = _DataWriter(tmp_data)
    try:
        initializers = []
        for tensor in graph.initializer:
            if tensor.name not in weights or tensor.name in keep:
                initializers.append(writer.copy(tensor, base))
            if tensor.name not in weights:
                continue
            q, scale = quantize_weight(read_weight(tensor, base))
            initializers += [writer.add(f"{tensor.name}_quantized", q),
                             writer.add(f"{tensor.name}_scale", scale),
                             writer.add(f"{tensor.name}_zero_point", np.zeros(scale.shape, np.int8))]
        writer.close()
        _rewrite_nodes(graph, weights)
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        for tensor in graph.initializer:  # point at the final data file's name
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(model, tmp_graph)
        os.replace(tmp_data, data)
        os.replace(tmp_graph, dst)
    except BaseException:
        writer.close()
        tmp_data.unlink(missing_ok=True)
        tmp_graph.unlink(missing_ok=True)
        raise
    return [dst, data]


def _rewrite_nodes(graph: onnx.GraphProto, weights: set[str]) -> None:
    """Each MatMul on a weight in `weights` becomes the integer pattern; one DynamicQuantizeLinear
    per activation, shared by the MatMuls that read it (q, k and v, say)."""
    nodes, quantized_inputs = [], {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        a, w, (y,) = node.input[0], node.input[1], node.output
        if a not in quantized_inputs:
            quantized_inputs[a] = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(quantized_inputs[a]),
                                          name=f"{a}_QuantizeLinear"))
        a_q, a_scale, a_zp = quantized_inputs[a]
        prefix = node.name or y
        nodes += [
            helper.make_node("MatMulInteger", [a_q, f"{w}_quantized", a_zp, f"{w}_zero_point"], [f"{y}_int32"],
                             name=f"{prefix}_quant"),
            helper.make_node("Cast", [f"{y}_int32"], [f"{y}_float"], to=TensorProto.FLOAT, name=f"{prefix}_cast"),
            helper.make_node("Mul", [a_scale, f"{w}_scale"], [f"{y}_scales"], name=f"{prefix}_scales_mul"),
            helper.make_node("Mul", [f"{y}_float", f"{y}_scales"], [y], name=f"{prefix}_output_scale_mul"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
