"""The backends' memory: nothing of a program is pinned in RAM."""

import sys

import pytest

from sphinx_edge.rss import _status_kib
from sphinx_edge.runtime.pipeline import Pipeline

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="mlock's limits and /proc/self/status are Linux's")


@linux_only
def test_the_pte_backend_pins_none_of_the_program(pte_export):
    """ExecuTorch's bindings pin what they map where they may (root); the constants (the embedding
    table) would then stay resident whole."""
    _, out, _ = pte_export
    before = _status_kib("VmLck")
    pipeline = Pipeline(out, "pte", threads=1)
    assert _status_kib("VmLck") == before, "the loaded program pins memory"
    del pipeline
