"""Atomic writes: a reader never sees a half-written file or directory (temp + fsync + rename).

Temporary files and directories are created private (0600 / 0700) by the standard library; what
they become gets the permissions a plain `open` or `mkdir` would give under the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def publish_mode(path: str | os.PathLike) -> None:
    """Gives a temp file 0666 and a temp directory 0777, less the umask (what open / mkdir give)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        publish_mode(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(new: Path, target: Path) -> None:
    """Puts directory `new` at `target`. An existing `target` stays whole until `new` is in its place
    (one atomic swap on Linux; elsewhere it is renamed aside first), then it is removed."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):  # `new` now holds the old directory
        shutil.rmtree(new)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
    aside.rmdir()
    target.rename(aside)
    try:
        new.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS (file system or kernel without it): fall back
