"""XNNPACK's graph passes, run only where they can change a partition.

ExecuTorch runs the same 17 passes on every partition it hands to XNNPACK, and most of them end by
re-tracing the whole partition with fake tensors, whether they changed it or not. For our graphs
most passes find nothing to do: profiled on the bundled Nano (36 partitions), 14 of the 17 never
changed a partition's graph, and the 12 in the table below took 21 of the 61 s of lowering
(benchmarks/RESULTS.md, "Export on a laptop (issue 22, third part)"). A pass here is skipped when none of the operators it
rewrites occurs in the partition: it would only re-trace a graph that the previous pass already
re-traced, which gives back the same graph (the written program is byte-identical; tested).

`acts_on()` is the table: pass name -> a test of the partition's graph. A pass not in the table always
runs. The operator lists come from the passes themselves (their class attributes where they
have them); tests/export/test_xnnpack_passes.py checks the two pattern-matching passes against
ExecuTorch's own pattern graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def op_names(graph_module: torch.fx.GraphModule) -> set[str]:
    """The operators a graph calls, as `aten.cat.default`-style names."""
    return {getattr(n.target, "__name__", str(n.target)) for n in graph_module.graph.nodes if n.op == "call_function"}


def _names(ops) -> set[str]:
    return {getattr(op, "__name__", str(op)) for op in ops}


def _any_of(*ops: str) -> Callable[[torch.fx.GraphModule], bool]:
    return lambda gm: not op_names(gm).isdisjoint(ops)


def _long_concatenation(gm: torch.fx.GraphModule) -> bool:
    # DecomposeConcatenate splits a cat of more than 5 tensors (XNNPACK's largest concatenation)
    return any(n.op == "call_function" and getattr(n.target, "__name__", "") == "aten.cat.default"
               and len(n.args[0]) > 5 for n in gm.graph.nodes)


def acts_on() -> dict[str, Callable[[torch.fx.GraphModule], bool]]:
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack._passes.decompose_batch_norm import DecomposeBatchNorm
    from executorch.backends.xnnpack._passes.fuse_activation_pass import FuseActivationPass

    batch_norm = _any_of(*_names(DecomposeBatchNorm.BATCH_NORM_OPS))
    return {
        # its pattern is the op itself, rewritten only where an earlier decomposition split it
        "ConvertToUpsampleBilinear2d": _any_of("aten.upsample_bilinear2d.vec"),
        # every SDPA pattern holds the "safe softmax" test for fully masked rows (aten.any.dim)
        "ConvertToSDPAPass": _any_of("aten.any.dim"),
        "ConvertToLinearPass": _any_of(*_names(ConvertToLinearPass.targets)),
        "FuseBatchNormPass": batch_norm,
        "DecomposeBatchNorm": batch_norm,
        "FuseActivationPass": _any_of(*_names(FuseActivationPass.FUSEABLE_ACTIVATIONS)),
        "DecomposeConcatenate": _long_concatenation,
        "RemoveGetItemPass": _any_of("aten.max_pool2d_with_indices.default", "aten.max.dim"),
        "InsertPadQDQPass": _any_of("aten.constant_pad_nd.default"),
        "Conv1dUnsqueezePass": _any_of("aten.convolution.default"),
        "PReLUReshapePass": _any_of("aten._prelu_kernel.default"),
        "RemoveRedundantCopyPass": _any_of("aten._to_copy.default"),
    }


@contextlib.contextmanager
def only_passes_that_act() -> Iterator[None]:
    """Within: XNNPACK's pass manager skips a pass (`acts_on`) whose operators a partition lacks."""
    from executorch.backends.xnnpack import _passes
    from executorch.backends.xnnpack._passes import XNNPACKPassManager, XNNPACKPass
    from executorch.exir.pass_base import ExportPass

    table = acts_on()
    transform = XNNPACKPassManager.transform

    def selective_transform(self) -> torch.export.ExportedProgram:
        ep = self.exported_program
        for pass_ in self.passes:
            test = table.get(pass_.__name__)
            if test is not None and not test(ep.graph_module):
                continue
            if issubclass(pass_, XNNPACKPass):
                ep = _passes._transform(ep, pass_(ep))
            elif issubclass(pass_, ExportPass):
                ep = _passes._transform(ep, pass_())
            else:  # as ExecuTorch's own transform does
                raise RuntimeError(f"Expecting ExportPass or ExportPass(), but got pass: {pass_}")
        return ep

    XNNPACKPassManager.transform = selective_transform
    try:
        yield
    finally:
        XNNPACKPassManager.transform = transform
