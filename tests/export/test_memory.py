"""ScratchWeights: parameters in a scratch file, out of the resident set once written."""

import os

import pytest
import torch

from sphinx_edge.export.memory import ScratchWeights
from sphinx_edge.rss import rss_mib


def test_parameters_keep_their_values_but_not_their_pages(tmp_path):
    torch.empty(1)  # torch's own first-use allocations before the baseline
    before = rss_mib()
    with ScratchWeights(tmp_path) as store:
        made = []
        for i in range(5):  # 320 MiB over several chunks' worth of calls, and odd sizes between
            t = store.new(torch.Size((16, 1024, 1024)), torch.float32)
            t.fill_(i)
            store.written()
            odd = store.new(torch.Size((3, 5)), torch.float16)
            odd.fill_(-i)
            made += [(i, t), (-i, odd)]
        grown = rss_mib() - before
        assert grown < 64, f"{grown:.0f} MiB of 320 stayed resident"
        assert all(bool((t == value).all()) for value, t in made)  # read back from the file
        assert all(t.data_ptr() % ScratchWeights.ALIGN == 0 and t.is_contiguous() for _, t in made)
    assert os.listdir(tmp_path) == []  # the file is unlinked from the start
    assert all(bool((t == value).all()) for value, t in made)  # the mappings live with the tensors


def test_a_full_disk_is_an_error_not_a_crash(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with ScratchWeights(tmp_path) as store, pytest.raises(OSError, match="No space"):
        store.new(torch.Size((4, 4)), torch.float32)
