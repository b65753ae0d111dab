"""Child processes that never outlive their parent, and signals that clean up like Ctrl-C.

`run_in_child(fn, *args)` runs `fn(*args)` in a fresh spawned interpreter and returns its result.
The child dies with its parent however the parent ends: Linux's parent-death signal where there
is one, and everywhere a watcher thread that ends the child when the pipe from its parent closes
(the kernel closes it when the parent dies, even of SIGKILL). When the parent stops waiting (an
exception, Ctrl-C, SIGTERM), the child is killed before the exception goes on.

`exit_on_signals()` makes SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread, so
that the `finally` / `except BaseException` clean-ups that Ctrl-C runs also run for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sphinx_edge.errors import UserError

PR_SET_PDEATHSIG = 1


class ChildFailed(UserError, RuntimeError):
    """The child process died without an answer (killed, out of memory, a crash in native code)."""


class ChildCancelled(RuntimeError):
    """The child process was stopped on request (`run_in_child`'s `cancel`)."""


def exit_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """SIGTERM / SIGHUP -> SystemExit(128 + signum) in the main thread (only the main thread may
    set handlers; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    for s in signals:
        signal.signal(s, handler)


def _die_with_parent(watch, parent: int) -> None:
    """In the child: end this process when the parent does."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def wait_for_parent() -> None:
        try:
            watch.recv()  # nothing is ever sent: this returns (EOFError) when the parent's end closes
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=wait_for_parent, name="parent-watch", daemon=True).start()


def _logger_levels() -> dict[str, int]:
    """The levels this process set on named loggers (the CLI quiets some libraries' warnings), so
    that a spawned child, which starts with none of them, prints what the parent would."""
    return {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET}


PROGRESS, RESULT, ERROR = "progress", "result", "error"  # what a child sends


def _child_main(conn, watch, parent: int, levels: dict[str, int], fn: Callable[..., Any], args: tuple,
                reports: bool) -> None:
    _die_with_parent(watch, parent)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        if reports:
            args = (*args, lambda line: conn.send((PROGRESS, line)))
        conn.send((RESULT, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which re-raises it
        try:
            conn.send((ERROR, e))
        except Exception:  # not picklable: send what it said
            conn.send((ERROR, ChildFailed(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    finally:
        conn.close()


def run_in_child(fn: Callable[..., Any], *args: Any, on_progress: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Any:
    """`fn(*args)` in a spawned process that cannot outlive this one; its exception re-raised here.
    `fn` and `args` must be picklable. With `on_progress`, `fn` gets one more argument, a function
    of one string, and each string it is given reaches `on_progress` here as the child runs. Setting
    `cancel` (from another thread) kills the child and raises ChildCancelled."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    watch_read, watch_write = ctx.Pipe(duplex=False)  # only this process holds the write end
    child = ctx.Process(target=_child_main, args=(send, watch_read, os.getpid(), _logger_levels(), fn, args,
                                                  on_progress is not None))

    def next_message() -> tuple:
        while cancel is not None and not receive.poll(0.2):
            if cancel.is_set():
                raise ChildCancelled("the stage process was stopped")
        return receive.recv()

    try:
        child.start()
        watch_read.close()
        send.close()
        try:
            kind, value = next_message()
            while kind == PROGRESS:
                on_progress(value)
                kind, value = next_message()
        except EOFError:
            child.join()
            raise ChildFailed(f"the stage process died (exit code {child.exitcode}"
                              + (", killed: out of memory?" if child.exitcode == -signal.SIGKILL else "")
                              + ")") from None
        child.join()
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        for conn in (watch_read, watch_write, send, receive):
            conn.close()
    if kind == ERROR:
        raise value
    return value


@contextlib.contextmanager
def native_output_silenced():
    """Discards what native code writes to stdout and stderr inside the block (ExecuTorch's
    threadpool logs its CPU probing there, line by line, on every start); Python's own output is
    flushed first and is unaffected after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@functools.cache
def _glibc():
    """glibc's C library where this process runs on it (None on musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


MADV_DONTNEED = 4


def file_mappings(files: Sequence[os.PathLike | str]) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `files` (resolved paths; Linux's /proc/self/maps);
    [] elsewhere."""
    wanted = {str(f) for f in files}
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines() if wanted else []
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in wanted:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            found.append((start, end))
    return found


def drop_mapped_pages(mappings: list[tuple[int, int]]) -> None:
    """Hands back the resident pages of file mappings (`file_mappings`): of a private read-only one
    (a checkpoint), or of a shared one (its written pages stay in the page cache, bound for the file):
    a later read faults them in from the file again. Never for anonymous memory, which the same advice
    zeroes."""
    libc = _glibc()
    if libc is not None:
        for start, end in mappings:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK = 2**20


def return_large_blocks_promptly() -> None:
    """Large blocks (>= 1 MiB: activations, logits) get their own mappings, returned to the system
    the moment they are freed. glibc raises its mmap threshold each time such a block is freed, up
    to 32 MiB, after which the vision encoder's activations come from the heap and stay resident
    between views (170 MiB of SPHINX-Tiny's peak; benchmarks/RESULTS.md, "Memory of a full answer").
    Setting the threshold fixes it. Elsewhere nothing needs doing."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)


def release_free_memory() -> None:
    """Hands the memory that this process has freed back to the system where the allocator keeps
    it (glibc's heap), so that the vision encoder's last activations do not stay in the resident set
    through the prefill. Elsewhere nothing needs doing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_CAP_IPC_LOCK = 14  # linux/capability.h
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def memory_pinning_refused() -> Iterator[None]:
    """Within it, this thread cannot pin (mlock) memory. ExecuTorch's Python bindings map a program
    and pin what they load, ignoring a refusal: SPHINX-Tiny's constant segment, the fp32 token
    embedding table (254 MiB) of which an answer reads a few rows, would stay resident all along.
    An unprivileged process is refused already (RLIMIT_MEMLOCK, 8 MiB by default); a root one, as
    in most containers, is not (CAP_IPC_LOCK), so the same answer took 254 MiB more. Linux only; a
    no-op elsewhere, and where the limits cannot be changed."""
    libc = _glibc()
    if libc is None:
        yield
        return
    import resource  # Unix only

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, hard))
    header, data = _CapHeader(_CAPABILITY_VERSION_3, 0), (_CapData * 2)()  # pid 0: this thread
    had_lock = libc.capget(ctypes.byref(header), data) == 0 and data[0].effective >> _CAP_IPC_LOCK & 1
    if had_lock:
        data[0].effective &= ~(1 << _CAP_IPC_LOCK)
        had_lock = libc.capset(ctypes.byref(header), data) == 0
    try:
        yield
    finally:
        if had_lock:
            data[0].effective |= 1 << _CAP_IPC_LOCK
            libc.capset(ctypes.byref(header), data)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
