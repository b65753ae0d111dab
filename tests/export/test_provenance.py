"""shared_provenance: torch.fx's provenance records shared, not deep-copied, and otherwise the same."""

import torch

from sphinx_edge.export.provenance import shared_provenance


def test_a_new_record_shares_its_predecessors_history_and_leaves_the_node_as_it_was():
    from torch.fx.traceback import NodeSource, NodeSourceAction

    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    older = NodeSource(None, "first pass", NodeSourceAction.CREATE)
    node.meta["from_node"] = [older]
    copied = NodeSource(node, "a pass", NodeSourceAction.CREATE)
    with shared_provenance():
        shared = NodeSource(node, "a pass", NodeSourceAction.CREATE)
    assert shared.from_node == [older] and shared.from_node[0] is older  # shared, not a copy
    assert copied.from_node[0] is not older and copied.to_dict() == shared.to_dict()  # same content
    assert node.meta["from_node"] == [older]
    assert NodeSource(node).from_node[0] is not older  # outside the block: torch's own behaviour again
