"""Faster tracing: torch.fx's node provenance shared instead of deep-copied (see `shared_provenance`)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def shared_provenance():
    """torch.fx records where every node came from (`node.meta["from_node"]`), and each pass that
    re-traces a graph deep-copies each node's whole history into its successor's: the copies grow
    with every pass, and on SPHINX-Nano they took a third of the vision encoder's lowering
    (benchmarks/RESULTS.md, "Export on a laptop"). Records are never changed once made, so within
    this block a new one shares its predecessors' instead of copying them. ExecuTorch does not write
    them into a program, and the ONNX exporter's copies are dropped with the rest of the metadata
    (`onnx.tidy`): the bytes are the same."""
    from torch.fx.traceback import NodeSource

    original = NodeSource.__init__

    def __init__(self, node=None, pass_name: str = "", action=None) -> None:
        history = node.meta.get("from_node") if node is not None else None
        if history is not None:
            del node.meta["from_node"]  # not copied here...
        try:
            original(self, node, pass_name, action)
        finally:
            if history is not None:
                node.meta["from_node"] = history
        if history is not None:
            self.from_node = list(history)  # ...but shared: the records are immutable

    NodeSource.__init__ = __init__
    try:
        yield
    finally:
        NodeSource.__init__ = original
