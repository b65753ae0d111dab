"""ExecuTorch export: one `program.pte` with the methods ExecuTorch's multimodal runner expects.

Methods (docs/ARCHITECTURE.md, section 4): `vision_encoder` (one packed view [1, 3, tile + dino, tile]),
`token_embedding` (ids [1, L] over text vocabulary + skip/start/end), `text_decoder` (embeddings
[1, L, dim] + positions [L] -> last-token logits, static KV cache inside as mutable buffers), plus
constant methods with the metadata a runner reads (`get_max_seq_len`, `get_vocab_size`, ...).

Quantization is torchao's, applied to the eager modules before `torch.export`:
int4 = 8da4w (int8 dynamic activations, int4 weights per group, default group 32) and int8 = 8da8w
on the LLM linears; the vision linears get 8da8w for int8/int4; the embedding table optionally
int8 weight-only. Everything that XNNPACK supports is delegated to it; the vision encoder is first
rewritten (xnnpack_rewrites.py) so that XNNPACK takes nearly all of it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from sphinx_edge.export.graphs import TextDecoder, TokenEmbedding, VisionEncoder
from sphinx_edge.export.memory import release_memory
from sphinx_edge.export.onnx import quiet
from sphinx_edge.export.options import ExportOptions, Format
from sphinx_edge.export.provenance import shared_provenance
from sphinx_edge.export.stages import StageLog
from sphinx_edge.export.xnnpack_passes import only_passes_that_act
from sphinx_edge.export.xnnpack_rewrites import ATTENTION_AS_MATMULS, prepare_vision_for_xnnpack
from sphinx_edge.io import atomic_path
from sphinx_edge.model.sphinx import TRIM_EVERY, SphinxModel, each_module

METHODS = ("vision_encoder", "token_embedding", "text_decoder")


def linear_quantizer(quant: str, group_size: int, vision_quant: str,
                     delegate: str = "xnnpack") -> Callable[[str, nn.Module], None]:
    """What the program does to a Linear, by where it sits (`on_module` of `ModelSource.load`): the
    LLM's blocks and output int4 per group / int8 per channel, the vision experts' and projectors'
    int8 per channel. XNNPACK: int8 dynamic activations too (8da4w / 8da8w); Core ML: weight-only
    int8, the form it folds into its constexpr dequantization ops (it has no dynamic activation
    quantization). Weights are quantized one Linear at a time and the freed fp32 memory handed back
    to the OS every 256 MB: glibc keeps freed mid-size blocks in its heap, and on SPHINX-Tiny the
    process otherwise grew by 5 GB and kept 7 GB of dead fp32 weights through the lowering."""
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    def config(bits: int, weight_only: bool = False):
        dtype, granularity = getattr(torch, f"int{bits}"), PerGroup(group_size) if bits == 4 else PerAxis(0)
        return (IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity) if weight_only else
                Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity))

    llm = config(4 if quant == "int4" else 8) if quant in ("int8", "int4") else None
    vision = config(8, weight_only=delegate == "coreml") if vision_quant == "int8" else None
    freed = 0

    def quantize(name: str, module: nn.Module) -> None:
        nonlocal freed
        if not isinstance(module, nn.Linear):
            return
        if name == "llm.output" or name.startswith("llm.layers."):
            chosen = llm
        else:  # the vision experts (CLIP and the Q-Former too, in the four-expert models) and projectors
            chosen = None if name.startswith("llm.") else vision
        if chosen is None:
            return
        freed += module.weight.numel() * module.weight.element_size()
        with quiet():
            quantize_(module, chosen, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        if freed >= TRIM_EVERY:
            release_memory()
            freed = 0

    return quantize


class Int8Embedding(nn.Module):
    """The embedding table in int8 with one scale per row (symmetric), looked up by ExecuTorch's
    `quantized_decomposed::embedding_byte` kernel as its own llama export does: a quarter of the
    fp32 bytes, dequantized row by row as tokens are looked up. (torchao's weight-only config
    lowers to a `dequantize_affine` that ExecuTorch has no kernel for.)"""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        scales = table.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(table / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(self.weight, self.scales, None, -127, 127, input_ids,
                                                                  dtype=torch.float32)


def _quantize_embedding(embedding: TokenEmbedding) -> None:
    import executorch.kernels.quantized  # noqa: F401  defines quantized_decomposed::embedding_byte

    embedding.embedding = Int8Embedding(embedding.embedding.weight.detach())


def constant_methods(model: SphinxModel, tokenizer_ids: dict[str, int] | None = None) -> dict:
    """Metadata a runner reads without running a graph (ExecuTorch's `get_*` convention)."""
    cfg = model.config
    meta = {
        "get_max_seq_len": cfg.llm.max_seq_len,
        "get_max_context_len": cfg.llm.max_seq_len,
        "get_vocab_size": cfg.llm.vocab_size,
        "get_n_layers": cfg.llm.n_layers,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_skip_id": cfg.skip_id,
        "get_tokens_per_view": cfg.tokens_per_view,
        "get_tile_size": cfg.convnext.image_size,
        "get_dino_size": cfg.dinov2.image_size,
        "get_grid": cfg.grid,
    }
    if tokenizer_ids:
        meta["get_bos_id"] = tokenizer_ids["bos"]
        meta["get_eos_ids"] = [tokenizer_ids["eos"]]
    return meta


def with_context(model: SphinxModel, max_seq_len: int) -> SphinxModel:
    """`model` (in place) as a model whose context is `max_seq_len`: the size of the static KV cache
    and what the program's shapes and constant methods say."""
    model.config = model.config.with_context(max_seq_len)
    model.llm.config = model.config.llm
    return model


def export_programs(model: SphinxModel, embedding_quant: str,
                    delegate: str = "xnnpack") -> dict[str, torch.export.ExportedProgram]:
    """The three methods as ExportedPrograms of `model`, its linears quantized already
    (`linear_quantizer`); the vision encoder is rewritten for XNNPACK in place."""
    cfg = model.config
    model = model.eval()
    if delegate == "xnnpack":
        prepare_vision_for_xnnpack(model)
    embedding = TokenEmbedding(model)
    if embedding_quant == "int8":
        _quantize_embedding(embedding)
    # One view per call, as the runtime and ExecuTorch's MultimodalRunner call it: ExecuTorch plans
    # (and allocates at load) a method's activations for its largest input, and a dynamic view axis
    # up to 5 views planned 538 MiB for SPHINX-Tiny's vision encoder (benchmarks/RESULTS.md,
    # "Memory of a full answer").
    pixels = torch.zeros(1, 3, cfg.convnext.image_size + cfg.dinov2.image_size, cfg.convnext.image_size)
    seq = Dim("seq_len", min=1, max=cfg.llm.max_seq_len)
    decoder = TextDecoder(model, max_seq_len=cfg.llm.max_seq_len)
    programs = {}
    with quiet(), torch.no_grad():
        programs["vision_encoder"] = torch.export.export(VisionEncoder(model), (pixels,))
        if delegate == "xnnpack":
            programs["vision_encoder"] = programs["vision_encoder"].run_decompositions(ATTENTION_AS_MATMULS)
        programs["token_embedding"] = torch.export.export(
            embedding, (torch.zeros(1, 3, dtype=torch.long),), dynamic_shapes=({1: seq},))
        programs["text_decoder"] = torch.export.export(
            decoder, (torch.zeros(1, 3, cfg.llm.dim), torch.arange(3)),
            dynamic_shapes=({1: seq}, {0: seq}))
    return programs


def _partitioners(delegate: str) -> dict[str, list]:
    """The delegate of the vision encoder and of the text decoder (the embedding lookup stays portable).

    With coreml only the vision encoder goes to Core ML: the decoder's KV cache lives in
    ExecuTorch's LLM custom ops, which coremltools has no conversion for, and skipping those ops
    leaves partitions whose inputs are symbolic sizes, which it cannot take either. The decoder
    stays on XNNPACK."""
    return {"vision_encoder": [_partitioner(delegate)], "text_decoder": [_partitioner("xnnpack")]}


def _partitioner(delegate: str):
    if delegate == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return XnnpackPartitioner()
    # Core ML: an .mlpackage per delegated graph, compiled on the Apple device when first loaded
    # (compiling it here needs macOS). fp16 compute for the Neural Engine; iOS 18 / macOS 15.
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.compiler.coreml_preprocess import MULTIMETHOD_WEIGHT_SHARING_STRATEGY
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=ct.target.iOS18,
                                                 compute_precision=ct.precision.FLOAT16,
                                                 model_type=CoreMLBackend.MODEL_TYPE.MODEL)
    # The methods share no weights; each is converted on its own.
    specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
        MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
    return CoreMLPartitioner(compile_specs=specs)


def export_pte(model: SphinxModel | Callable[..., SphinxModel], out_dir: str | os.PathLike, *, quant: str = "fp32",
               group_size: int = 32, vision_quant: str = "fp32", embedding_quant: str = "fp32", tokenizer_ids=None,
               log: StageLog | None = None, in_place: bool = False, delegate: str = "xnnpack",
               max_seq_len: int | None = None) -> dict:
    """Writes `out_dir/program.pte`; returns the manifest's `graphs.pte` entry. `model`: a model, or a
    loader `load(on_module)` (`ModelSource.load`), which is given the quantizer to apply to each module
    as its weights arrive. A model's own linears are quantized with `in_place` (the caller no longer
    needs its fp32 weights), else a copy's. `max_seq_len`: the program's context (its static cache),
    default the model's. `delegate`: xnnpack (CPU, any platform) or coreml (the vision encoder on
    Apple's Core ML, with weight-only int8; the decoder on XNNPACK, see `_partitioners`). `log` gets
    three stages: quantize and export, lower, write."""
    ExportOptions(quant=quant, formats=(Format.PTE,), vision_quant=vision_quant, embedding_quant=embedding_quant,
                  group_size=group_size, delegate=delegate)  # the rules (raises ExportError)
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    log = log or StageLog()
    quantize = linear_quantizer(quant, group_size, vision_quant, delegate)
    with log.stage("pte quantize, torch.export"), shared_provenance():
        if isinstance(model, nn.Module):
            model = each_module(model if in_place else copy.deepcopy(model), quantize)
        else:  # a loader: quantizes each module as its weights arrive
            model = model(quantize)
        release_memory()
        if max_seq_len:
            with_context(model, max_seq_len)
        methods = constant_methods(model, tokenizer_ids)
        programs = export_programs(model, embedding_quant, delegate)
        del model  # the programs hold the (quantized) weights they need
    # The delegates' weight blobs wait on disk (next to the output) from their partition's lowering
    # until the program is written, instead of in memory (`_xnnpack_lowering`).
    with tempfile.TemporaryDirectory(prefix=".lowering-", dir=out_dir) as blobs:
        with log.stage(f"pte lower ({delegate})"), quiet(), _xnnpack_lowering(log.say, blobs), shared_provenance(), \
                only_passes_that_act():
            edge = to_edge_transform_and_lower(
                programs,
                partitioner=_partitioners(delegate),
                constant_methods=methods,
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            del programs  # the edge programs hold what they need
            _drop_delegated_weights(edge)
            release_memory()
        with log.stage("pte write"), quiet(), shared_provenance():
            program = edge.to_executorch(ExecutorchBackendConfig(
                sym_shape_eval_pass={name: ConstraintBasedSymShapeEvalPass() for name in METHODS}))
            del edge
            release_memory()
            path = Path(out_dir) / "program.pte"
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                program.write_to_file(f)  # streamed: `program.buffer` would join the whole file in memory first
            del program
    return {"program": {"files": [path.name], "methods": list(METHODS), "delegate": delegate,
                        "constant_methods": sorted(methods)}}


def _drop_delegated_weights(edge) -> None:
    """Lets go of the weights the delegates have taken in: each LoweredBackendModule keeps its
    partition's original program, state dict included, for its graph (debug handles, the output
    count; `to_executorch` re-traces it with fake tensors), but nothing reads the weights' values
    after lowering. Each becomes a view with its shape, strides and dtype into one zero buffer (as
    large as the largest weight): the bytes written are the same."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    held = [(d, k, t) for name in edge.methods
            for m in edge.exported_program(name).graph_module.modules() if isinstance(m, LoweredBackendModule)
            for d in (m.original_module.state_dict, m.original_module.constants)
            for k, t in d.items() if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel()]
    if not held:
        return

    def span(t: torch.Tensor) -> int:  # elements of its storage a tensor reaches
        return t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1

    zeros = torch.zeros(max(span(t) * t.element_size() for _, _, t in held), dtype=torch.uint8)
    for d, k, t in held:
        view = torch.as_strided(zeros[:span(t) * t.element_size()].view(t.dtype), t.shape, t.stride(),
                                t.storage_offset())
        d[k] = nn.Parameter(view, requires_grad=False) if isinstance(t, nn.Parameter) else view


@contextlib.contextmanager
def _xnnpack_lowering(say: Callable[[str], None], blobs: str | None = None):
    """XNNPACK lowering that reports and keeps memory down (ExecuTorch 1.5's hooks; the bytes written
    are the same):

    * each partition is reported as it is compiled ("text_decoder: partition 4 of 23"): lowering takes
      most of a large model's export, and ExecuTorch says nothing while it runs (it compiles a
      backend's partitions in one `preprocess_multimethod` call, one `preprocess` each);
    * the copies ExecuTorch makes of every partition before compiling any share their weights;
    * each partition's packed weights go to a file in `blobs` until the program is written.

    On SPHINX-Tiny the last two were 3.0 and 2.65 GB of the lowering's peak (benchmarks/RESULTS.md,
    "Export on a laptop")."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    own = dict(XnnpackBackend.__dict__)
    from executorch.exir._serialize._cord import FileBackedData

    compile_one, compile_all = XnnpackBackend.preprocess, XnnpackBackend.preprocess_multimethod
    labels: list[str] = []

    def preprocess_multimethod(cls, edge_programs, compile_specs):
        labels[:] = [f"{method}: partition {i + 1} of {len(parts)}"
                     for method, parts in edge_programs.items() for i in range(len(parts))][::-1]
        return compile_all.__func__(cls, edge_programs, compile_specs)

    def preprocess(edge_program, compile_specs):
        say(labels.pop() if labels else "a partition")
        result = compile_one(edge_program, compile_specs)
        if blobs is not None:  # the partition's weights, packed for XNNPACK: to disk until written
            buffers = result.data_store_output.buffers
            for i, data in enumerate(buffers):
                if isinstance(data, bytes) and len(data) >= 1 << 16:
                    fd, path = tempfile.mkstemp(dir=blobs, suffix=".bin")
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    buffers[i] = FileBackedData(path, cleanup=True, sha256=hashlib.sha256(data).digest())
        return result

    def copy_exported_program_for_preprocess(cls, edge_program, compile_specs):
        # ExecuTorch deep-copies every partition before lowering any, weights included; preprocess
        # replaces state-dict entries but never changes a tensor, so the copies share them (what
        # CudaBackend does in its low-memory mode).
        shared = {id(t): t for d in (edge_program.state_dict, edge_program.constants)
                  for t in d.values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, shared)

    XnnpackBackend.preprocess = staticmethod(preprocess)
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_exported_program_for_preprocess)
    XnnpackBackend.preprocess_multimethod = classmethod(preprocess_multimethod)
    try:
        yield
    finally:
        for name in ("preprocess", "preprocess_multimethod", "copy_exported_program_for_preprocess"):
            if name in own:
                setattr(XnnpackBackend, name, own[name])
            else:
                delattr(XnnpackBackend, name)
