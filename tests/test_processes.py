"""Spawned stage processes (sphinx_edge.processes): they answer, and they keep the parent's quiet loggers;
memory pinning refused where asked."""

import ctypes
import logging
import sys

import pytest

from sphinx_edge.processes import ChildFailed, memory_pinning_refused, run_in_child


def level_of(name: str) -> int:
    return logging.getLogger(name).getEffectiveLevel()


def fail_with(message: str) -> None:
    raise ValueError(message)


def test_a_child_keeps_the_loggers_its_parent_quieted():
    """The CLI quiets some libraries' warnings (torchao's missing CUDA kernels); an export's stages run
    in spawned processes, which must not print them either."""
    quiet = logging.getLogger("sphinx-edge-test.quiet")
    quiet.setLevel(logging.ERROR)
    try:
        assert run_in_child(level_of, "sphinx-edge-test.quiet") == logging.ERROR
        assert run_in_child(level_of, "sphinx-edge-test.untouched") == logging.WARNING  # the root's default
    finally:
        quiet.setLevel(logging.NOTSET)


def test_a_childs_exception_is_raised_in_the_parent():
    with pytest.raises(ValueError, match="from the child"):
        run_in_child(fail_with, "from the child")
    assert issubclass(ChildFailed, RuntimeError)


def count_to(n: int, say) -> str:
    for i in range(1, n + 1):
        say(f"{i} of {n}")
    return "done"


def test_a_childs_progress_reaches_the_parent_in_order_before_its_answer():
    lines = []
    assert run_in_child(count_to, 3, on_progress=lines.append) == "done"
    assert lines == ["1 of 3", "2 of 3", "3 of 3"]


@pytest.mark.skipif(sys.platform != "linux", reason="mlock's limits are Linux's")
def test_nothing_is_pinned_within_and_the_limits_come_back():
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(1 << 16)
    limits = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    could_pin = libc.mlock(buffer, len(buffer)) == 0
    libc.munlock(buffer, len(buffer))
    with memory_pinning_refused():
        assert libc.mlock(buffer, len(buffer)) != 0, "pinned although refused (root keeps CAP_IPC_LOCK?)"
    assert resource.getrlimit(resource.RLIMIT_MEMLOCK) == limits
    assert (libc.mlock(buffer, len(buffer)) == 0) == could_pin, "the right to pin did not come back"
    libc.munlock(buffer, len(buffer))
