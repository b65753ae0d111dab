"""XNNPACK's passes run only where they can change a partition: the same program, fewer re-traces."""

import contextlib
import hashlib

import torch
from torch import nn

from sphinx_edge.export import xnnpack_passes
from sphinx_edge.export.xnnpack_passes import acts_on, only_passes_that_act


def _edge_graph(module: nn.Module, *args) -> torch.fx.GraphModule:
    from executorch.exir import EdgeCompileConfig, to_edge

    program = to_edge(torch.export.export(module, args), compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return program.exported_program().graph_module


class _LinearRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.linear(x))


class _Concatenate(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x):
        return torch.cat([x * i for i in range(self.n)], dim=1)


def test_a_pass_runs_where_its_operators_occur_and_not_elsewhere():
    table = acts_on()
    relu = _edge_graph(_LinearRelu(), torch.zeros(2, 4))
    assert table["FuseActivationPass"](relu)
    assert not table["FuseBatchNormPass"](relu) and not table["PReLUReshapePass"](relu)
    assert table["DecomposeConcatenate"](_edge_graph(_Concatenate(6), torch.zeros(1, 2)))
    assert not table["DecomposeConcatenate"](_edge_graph(_Concatenate(5), torch.zeros(1, 2)))
    assert not table["FuseActivationPass"](_edge_graph(_Concatenate(6), torch.zeros(1, 2)))
    assert table["Conv1dUnsqueezePass"](_edge_graph(nn.Conv1d(2, 2, 3), torch.zeros(1, 2, 8)))


def test_the_pattern_passes_need_an_operator_every_pattern_has():
    """ConvertToSDPAPass and ConvertToUpsampleBilinear2d match ExecuTorch's pattern graphs: the operator
    the table asks for must be in every one of them, or a skip could miss a match."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    assert all("aten.any.dim" in xnnpack_passes.op_names(g) for g in sdpa.get_graphs())
    assert all("aten.upsample_bilinear2d.vec" in xnnpack_passes.op_names(g) for g in bilinear_2d.get_graphs())


def test_skipping_passes_writes_the_same_program(pte_export, tokenizer_file, tmp_path, monkeypatch):
    """The session's test-tiny program (made with the skips) against one lowered with every pass."""
    from executorch.backends.xnnpack import _passes

    from sphinx_edge.export import executorch
    from sphinx_edge.export.exporter import ExportOptions, export_model
    from sphinx_edge.tokenizer import Tokenizer

    model, skipped, _ = pte_export
    ran = []
    transform = _passes._transform
    monkeypatch.setattr(_passes, "_transform", lambda ep, p: ran.append(type(p).__name__) or transform(ep, p))
    monkeypatch.setattr(executorch, "only_passes_that_act", contextlib.nullcontext)
    export_model(model, Tokenizer(tokenizer_file), tmp_path / "e", ExportOptions(quant="fp32", formats=("pte",),
                 verify=False), source={"random_init": True, "seed": 0})
    digest = [hashlib.sha256((d / "program.pte").read_bytes()).hexdigest() for d in (skipped, tmp_path / "e")]
    assert digest[0] == digest[1]
    assert "FuseBatchNormPass" in ran  # every pass did run here



def test_within_the_context_the_pass_manager_skips_passes_with_nothing_to_do(monkeypatch):
    from executorch.backends.xnnpack import _passes
    from executorch.exir import EdgeCompileConfig, to_edge

    program = to_edge(torch.export.export(_LinearRelu(), (torch.zeros(2, 4),)),
                      compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program()
    ran = []
    transform = _passes._transform
    monkeypatch.setattr(_passes, "_transform", lambda ep, p: ran.append(type(p).__name__) or transform(ep, p))
    with only_passes_that_act():
        _passes.XNNPACKPassManager(program).transform()
    assert "FuseActivationPass" in ran and "DimOrderOpsRevertPass" in ran  # relu present; not in the table
    assert "FuseBatchNormPass" not in ran and "ConvertToSDPAPass" not in ran
    ran.clear()
    _passes.XNNPACKPassManager(program).transform()  # outside: ExecuTorch's own transform again
    assert "FuseBatchNormPass" in ran
