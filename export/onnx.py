"""ONNX export: one graph per component (docs/ARCHITECTURE.md, section 4), then onnxruntime's quantizers.

Graphs come from `torch.onnx.export(dynamo=True)` at opset 18 with dynamic views, sequence and
past lengths, saved straight to disk; quantization then works file to file. Weights go to one
external-data file per graph (`<graph>.onnx.data`), so no graph hits protobuf's 2 GB limit. Quantization:

* int4: `MatMulNBitsQuantizer` (symmetric, block 32, accuracy level 4) on the decoder's MatMuls;
* int8: per-channel int8 weights and dynamic uint8 activations on MatMuls, the pattern of
  `quantize_dynamic`, written by our streaming quantizer (onnx_int8.py: onnxruntime's holds
  several copies of a multi-GB graph); embedding tables through `quantize_dynamic` itself;
* fp16: `convert_float_to_float16` with fp32 graph inputs and outputs.

The vision encoder is quantized to int8 at most (`vision_quant`); its convolutions stay fp32
(ConvInteger has no fast CPU kernel), only its MatMuls (ConvNeXt MLPs, DINOv2) are quantized.
"""

from __future__ import annotations

import contextlib
import math
import io
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from sphinx_edge.export.graphs import PastKVDecoder, TokenEmbedding, VisionEncoder
from sphinx_edge.export.memory import ScratchWeights, release_memory
from sphinx_edge.export.provenance import shared_provenance
from sphinx_edge.export.onnx_int8 import matmul_weights, quantize_matmuls_int8
from sphinx_edge.export.onnxruntime_rewrites import (chunk_convnext_mlps, fold_layer_scales,
                                                     matmul_convnext_downsamples)
from sphinx_edge.model.sphinx import SphinxModel
from sphinx_edge.runtime.manifest import decoder_io_names

OPSET = 18
QUANTS = ("fp32", "fp16", "int8", "int4")
VISION_QUANTS = ("fp32", "fp16", "int8")


@contextlib.contextmanager
def quiet():
    """torch.onnx and onnxruntime's quantizers print pages of progress; keep the CLI's own bar."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _export(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_shapes, path: Path, dim_names: dict[str, dict[int, str]] | None = None,
            store: ScratchWeights | None = None) -> None:
    """Exports straight to `path` (+ `path.data`): the weights stream from the module to disk
    instead of through an in-memory ModelProto, which would double a large model's memory.
    `dim_names` ({input: {axis: name}}) replaces torch.export's symbols (s0, s1, ...). `store`: the
    scratch file the weights live in, whose pages are handed back after each initializer is written
    (the last one's when the store is closed)."""
    import onnx_ir

    with quiet(), torch.no_grad(), shared_provenance():
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=OPSET, verbose=False,
                                    custom_translation_table=_translations())
        _data_file(path).unlink(missing_ok=True)
        # What `program.save(path, external_data=True)` does, with a word after each tensor (the
        # callback comes before each write: the one before has been written then)
        onnx_ir.save(program.model, path, external_data=_data_file(path).name,
                     callback=(lambda tensor, info: store.written()) if store else None)
    del program
    _forget_last_graph()
    tidy(path, dim_names or {})


def _forget_last_graph() -> None:
    """onnxscript's default rewrite rules are module-level objects whose matchers keep the last graph
    they looked at, and with it the weights of the module just exported: on SPHINX-Tiny the vision
    graph's 7.8 GB stayed alive while the decoder's graph was made (benchmarks/RESULTS.md, "Export on
    a laptop"). Dropped here, so one graph's weights go before the next graph's are made."""
    from onnxscript import rewriter

    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        matcher = getattr(rule, "_matcher", None)
        for held in ("_graph", "_current_node", "_match", "_tracer"):
            if getattr(matcher, held, None) is not None:
                setattr(matcher, held, None)


def _group_query_attention_schema() -> onnx.defs.OpSchema:
    """onnxruntime's `com.microsoft.GroupQueryAttention` as far as we call it (the onnx package
    carries no contrib-op schemas, and onnxscript builds a node from a schema)."""
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    tensors = ["query", "key", "value", "past_key", "past_value"]
    INT = onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[*(P(name, "T") for name in tensors), P("seqlens_k", "M"), P("total_sequence_length", "M"),
                *(P(name, "T", "", param_option=onnx.defs.OpSchema.FormalParameterOption.Optional)
                  for name in ("cos_cache", "sin_cache"))],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[A("num_heads", INT, ""), A("kv_num_heads", INT, ""), A("do_rotary", INT, ""),
                    A("rotary_interleaved", INT, "")])


def _translations() -> dict:
    """Our torch ops that become onnxruntime contrib ops in the graph."""
    import onnxscript
    from onnxscript import opset18 as op

    import sphinx_edge.export.graphs  # noqa: F401  defines torch.ops.sphinx.*

    fused = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention",
                                 _group_query_attention_schema())

    def group_query_attention(query, key, value, past_key, past_value, attention_mask, cos_cache,  # noqa: ANN001, ANN202
                              sin_cache, num_heads: int, kv_num_heads: int):
        # The fused op takes lengths rather than a mask: the last key index of each batch row
        # (seqlens_k) and the total length; an all-ones attention_mask gives both. Given the RoPE
        # tables it rotates q and k itself (rotate-half form), at the positions that follow the past.
        last = op.Sub(op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0), op.Constant(value_int=1))
        total = op.Squeeze(op.Shape(attention_mask, start=1, end=2), op.Constant(value_ints=[0]))
        int32 = onnx.TensorProto.INT32
        rotary = () if cos_cache is None else (cos_cache, sin_cache)
        return fused(query, key, value, past_key, past_value, op.Cast(last, to=int32), op.Cast(total, to=int32),
                     *rotary, num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=int(bool(rotary)),
                     rotary_interleaved=0)

    return {torch.ops.sphinx.group_query_attention.default: group_query_attention}


def tidy(path: Path, dim_names: dict[str, dict[int, str]]) -> None:
    """Drops the exporter's metadata (Python stack traces with source paths, symbol numbers; more or
    less verbose by what else the process had imported, so the same model gave other bytes) and renames
    symbolic dimensions everywhere in the graph at `path` by what they are on its inputs (optimum's
    names: sequence_length, past_sequence_length, ...); numbers the exporter's own value names in graph
    order (`renumber_values`); the weights are not touched."""
    proto = onnx.load(path, load_external_data=False)
    g = proto.graph
    for item in [g, *g.node, *g.input, *g.output, *g.value_info, *g.initializer, *(n for f in proto.functions for n in f.node)]:
        del item.metadata_props[:]
    renumber_values(g)
    rename = {}
    for value in proto.graph.input:
        for axis, name in dim_names.get(value.name, {}).items():
            rename[value.type.tensor_type.shape.dim[axis].dim_param] = name
    fuse_gelu(proto)
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info] if rename else []:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(proto, path)


GENERATED_NAME = re.compile(r"val_\d+")


def renumber_values(graph: onnx.GraphProto) -> None:
    """Renames the values torch.onnx named itself (`val_N`) val_0, val_1, ... in the order the graph's
    nodes first mention them. Its numbers have gaps where values were dropped, and which of two equal
    constants survives onnxscript's common-subexpression pass depends on where Python put them in
    memory: the same model exported after other work in one process named a constant `val_2`, in a
    fresh process `val_3` (tests/export/test_executorch_export.py). Graph order is the model's own."""
    order: dict[str, str] = {}
    for node in graph.node:
        for name in [*node.input, *node.output]:
            if GENERATED_NAME.fullmatch(name) and name not in order:
                order[name] = f"val_{len(order)}"
    for init in graph.initializer:  # read by no node: numbered too, so that no renamed value takes its name
        if GENERATED_NAME.fullmatch(init.name) and init.name not in order:
            order[init.name] = f"val_{len(order)}"
    if all(old == new for old, new in order.items()):
        return
    for node in graph.node:
        node.input[:] = [order.get(n, n) for n in node.input]
        node.output[:] = [order.get(n, n) for n in node.output]
    for item in [*graph.initializer, *graph.value_info, *graph.input, *graph.output]:
        item.name = order.get(item.name, item.name)


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, float]:
    """The one-element float initializers and Constants of `graph`, by name."""
    named = [(t.name, t) for t in graph.initializer]
    named += [(n.output[0], n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    return {name: float(onnx.numpy_helper.to_array(t).ravel()[0]) for name, t in named
            if t.data_type == onnx.TensorProto.FLOAT and t.data_location != onnx.TensorProto.EXTERNAL
            and math.prod(t.dims) == 1}


def fuse_gelu(proto: onnx.ModelProto) -> int:
    """Replaces torch's exact GELU, exported as `x * (0.5 * (erf(x / sqrt 2) + 1))`, by onnxruntime's
    fused `com.microsoft.Gelu` (the same function); returns how many. onnxruntime's own fusion does not
    match this operand order, and the five elementwise passes over ConvNeXt-XXL's 4x-wide MLP
    activations took a tenth of a SPHINX-Tiny view (benchmarks/RESULTS.md, "Faster vision")."""
    graph = proto.graph
    nodes = list(graph.node)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)

    def only_reader(name: str, op: str) -> int | None:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and nodes[found[0]].op_type == op else None

    def operand(node: onnx.NodeProto, this: str) -> str:
        return node.input[1] if node.input[0] == this else node.input[0]

    scalars = _scalar_constants(graph)  # read once: the graph has thousands of initializers

    def near(name: str, value: float) -> bool:
        return name in scalars and abs(scalars[name] - value) < 1e-6

    replaced: dict[int, onnx.NodeProto | None] = {}
    for i, div in enumerate(nodes):
        if div.op_type != "Div" or not near(div.input[1], 2 ** 0.5):
            continue
        x, chain, name = div.input[0], [i], div.output[0]
        for op in ("Erf", "Add", "Mul", "Mul"):
            j = only_reader(name, op)
            if j is None:
                break
            chain.append(j)
            name = nodes[j].output[0]
        if len(chain) < 5:
            continue
        erf, add, half, out = (nodes[j] for j in chain[1:])
        if not (near(operand(add, erf.output[0]), 1.0) and near(operand(half, add.output[0]), 0.5)
                and operand(out, half.output[0]) == x):
            continue
        replaced.update(dict.fromkeys(chain[:-1]))
        # In the last node's place, so the graph stays topologically sorted.
        replaced[chain[-1]] = onnx.helper.make_node("Gelu", [x], list(out.output), name=f"{out.name or name}_gelu",
                                                    domain="com.microsoft")
    if replaced:
        kept = [replaced.get(i, node) for i, node in enumerate(nodes) if replaced.get(i, node) is not None]
        # The constants (sqrt 2, 1, 0.5) the removed nodes read go too once nothing reads them: a
        # runtime warns about every unused initializer when it loads the graph.
        read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
        dropped = {name for i in replaced for name in nodes[i].input} - read
        kept = [n for n in kept if not (n.op_type == "Constant" and n.output[0] in dropped)]
        initializers = [t for t in graph.initializer if t.name not in dropped]
        del graph.node[:], graph.initializer[:]
        graph.node.extend(kept)
        graph.initializer.extend(initializers)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return sum(node is not None for node in replaced.values())


def vision_encoder_graph(model: SphinxModel, path: Path, store: ScratchWeights | None = None) -> None:
    """The vision encoder's graph; layer scales folded into the weights, ConvNeXt's large MLPs a few rows
    at a time and its downsamplings as matmuls (onnxruntime_rewrites; `model` is changed in place, with
    the same fp32 numbers)."""
    cfg = model.config
    fold_layer_scales(model, after_each=store.written if store else None)
    chunk_convnext_mlps(model.convnext)
    matmul_convnext_downsamples(model.convnext)
    pixels = torch.zeros(2, 3, cfg.convnext.image_size + cfg.dinov2.image_size, cfg.convnext.image_size)
    _export(VisionEncoder(model), (pixels,), ["pixel_values"], ["image_embeds"],
            ({0: Dim("num_views", min=1, max=64)},), path, store=store)


def token_embedding_graph(model: SphinxModel, path: Path, store: ScratchWeights | None = None) -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    _export(TokenEmbedding(model), (ids,), ["input_ids"], ["inputs_embeds"], ({1: Dim.DYNAMIC},), path,
            {"input_ids": {1: "sequence_length"}}, store)


def decoder_graph(model: SphinxModel, path: Path, store: ScratchWeights | None = None) -> None:
    c = model.config.llm
    past, seq = 2, 3
    embeds = torch.zeros(1, seq, c.dim)
    mask = torch.ones(1, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq)[None]
    cache = tuple(torch.zeros(1, c.n_kv_heads, past, c.head_dim) for _ in range(2 * c.n_layers))
    inputs, outputs = decoder_io_names(c.n_layers)
    dyn = Dim.DYNAMIC
    shapes = ({1: dyn}, {1: dyn}, {1: dyn}, tuple({2: dyn} for _ in cache))
    names = {"inputs_embeds": {1: "sequence_length"}, "attention_mask": {1: "total_sequence_length"},
             "position_ids": {1: "sequence_length"}, **{name: {2: "past_sequence_length"} for name in inputs[3:]}}
    _export(PastKVDecoder(model), (embeds, mask, positions, *cache), inputs, outputs, shapes, path, names, store)


def quantize_file(src: Path, quant: str, dst: Path, *, block_size: int = 32, accuracy_level: int = 4) -> list[Path]:
    """The graph at `src` quantized to `quant` and written to `dst` (+ data); returns the files written.
    `dst`'s folder takes scratch files too."""
    if quant == "fp32":
        proto = onnx.load(src)
    elif quant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with quiet():
            proto = convert_float_to_float16(onnx.load(src), keep_io_types=True, disable_shape_infer=True)
    elif quant == "int4":
        proto = quantize_int4(onnx.load(src), block_size=block_size, accuracy_level=accuracy_level)
    elif quant == "int8" and matmul_weights(onnx.load(src, load_external_data=False).graph):
        return quantize_matmuls_int8(src, dst)  # streamed: no copy of the graph's weights in memory
    elif quant == "int8":  # embedding tables (Gather)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = dst.with_name(f".{dst.name}.int8.onnx")
        try:
            with quiet():
                quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["Gather"], use_external_data_format=True)
            proto = onnx.load(tmp)
        finally:
            for f in tmp.parent.glob(f"{tmp.name}*"):
                f.unlink()
    else:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    return save_graph(proto, dst)


def quantize_int4(proto: onnx.ModelProto, *, block_size: int = 32, accuracy_level: int = 4) -> onnx.ModelProto:
    """`proto` with its MatMul weights as `--quant int4` writes them: onnxruntime's MatMulNBits,
    symmetric 4-bit blocks of `block_size` along the input, computed in int8 at accuracy level 4."""
    with quiet():
        quantizer = matmul_nbits_quantizer()(proto, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level)
        quantizer.process()
    return quantizer.model.model


def matmul_nbits_quantizer() -> type:
    """onnxruntime's MatMulNBitsQuantizer. Its module calls `logging.basicConfig(level=INFO)` when it is
    imported, after which every library's INFO lines (ExecuTorch's "Looking for libcustom_ops_aot_lib.so")
    reached the export's terminal; the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer


def _data_file(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def save_graph(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """Writes `path` and its external data `path.data`; returns the files written."""
    data = _data_file(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    return [path, data] if data.exists() else [path]


def graph_io(path: Path) -> dict:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]} as written in the manifest."""
    proto = onnx.load(path, load_external_data=False)

    def spec(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": spec(proto.graph.input), "outputs": spec(proto.graph.output)}


def check_quants(quant: str, vision_quant: str, embedding_quant: str) -> None:
    """Raises ValueError for a quantization the ONNX graphs do not offer (before any work is done)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if vision_quant not in VISION_QUANTS:
        raise ValueError(f"the vision encoder is quantized to int8 at most; got {vision_quant!r}")
    if embedding_quant not in ("fp32", "int8"):
        raise ValueError(f"the embedding table is fp32 or int8; got {embedding_quant!r}")


# Each graph, and the parts of the model it reads (`ModelSource.load(only=...)`): a stage makes only
# those, so SPHINX-Tiny's decoder graph is written with 4.4 GB of fp32 weights in memory, not 12.4.
VISION_PARTS = ("clip", "convnext", "dinov2", "qformer", "visual_proj", "qformer_proj", "start_img", "end_img")
GRAPHS = {"vision_encoder": (vision_encoder_graph, VISION_PARTS),
          "token_embedding": (token_embedding_graph, ("llm.tok_embeddings", "skip", "start_img", "end_img")),
          "decoder": (decoder_graph, ("llm",))}


def write_graphs(load: Callable[..., SphinxModel], out_dir: Path, on_stage=None) -> dict[str, Path]:
    """The three fp32 graphs in `out_dir`; {graph: .onnx path} (each with its `.onnx.data`). `load(only=
    parts, store=...)` gives a model with (at least) those parts' weights, in a scratch file in `out_dir`
    where it makes them (`ScratchWeights`: the graph's fp32 weights never all resident); one graph's
    model is let go before the next is made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (build, parts) in GRAPHS.items():
        if on_stage:
            on_stage(name)
        with ScratchWeights(out_dir) as store:
            build(load(only=parts, store=store), out_dir / f"{name}.onnx", store)
        release_memory()
        paths[name] = out_dir / f"{name}.onnx"
    return paths


def quantize_graphs(fp32: dict[str, Path], out_dir: Path, *, quant: str = "fp32", vision_quant: str = "fp32",
                    embedding_quant: str = "fp32", block_size: int = 32, accuracy_level: int = 4,
                    on_stage=None) -> dict[str, list[Path]]:
    """Each fp32 graph of `write_graphs`, quantized as its component wants, into `out_dir`
    (fp32 graphs are moved); {graph: files written}. Works from disk: no torch weights needed."""
    check_quants(quant, vision_quant, embedding_quant)
    wanted = {"vision_encoder": vision_quant, "token_embedding": embedding_quant, "decoder": quant}
    files = {}
    for name, src in fp32.items():
        dst, q = out_dir / src.name, wanted[name]
        if q == "fp32":
            files[name] = [src.replace(dst)]
            if _data_file(src).exists():
                files[name].append(_data_file(src).replace(_data_file(dst)))
            continue
        if on_stage:
            on_stage(f"{name}: {q}")
        files[name] = quantize_file(src, q, dst, block_size=block_size, accuracy_level=accuracy_level)
        src.unlink()
        _data_file(src).unlink(missing_ok=True)
    return files
