"""The one error path at the command line's boundary. Torch-free.

Every expected failure (bad input, a missing or unreadable file, a full disk, a tool that is not
installed) reaches the user as one line naming the file or argument and the problem, with exit
code 2. Anything else is a bug: one line saying so, exit code 1. `--debug` (or SPHINX_EDGE_DEBUG=1)
shows the Python traceback instead.

Expected failures are ValueError (our own errors derive from it: ImageLoadError, ManifestError,
...), OSError, MemoryError, and UserError for the few that are not about a value (a missing
device or tool).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USER_ERROR = 2
EXIT_BUG = 1
F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A failure the user can act on that is not about a value: a missing device, tool or package."""


EXPECTED: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError, UserError)
DEBUG_FROM_ENV = os.environ.get("SPHINX_EDGE_DEBUG", "") not in ("", "0")
debug = DEBUG_FROM_ENV  # set per invocation by the CLI's --debug


def user_message(error: BaseException) -> str:
    """One line for the user: what failed and where."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{os.fsdecode(error.filename)}: " if error.filename is not None else ""
        if error.errno == errno.ENOSPC:
            return f"{where}no space left on the device"
        return f"{where}{error.strerror}"
    if isinstance(error, MemoryError):
        return f"out of memory{': ' + str(error) if str(error) else ''} (a smaller model or fewer threads may fit)"
    if isinstance(error, UnicodeError):
        return f"text that is not valid Unicode: {error}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def guarded(command: F, report: Callable[[str], None]) -> F:
    """`command` with its expected failures reported as one line and exit code 2, other exceptions
    as one line and exit code 1 (a bug), unless debugging."""
    import typer  # 0.29+ carries its own click: its exceptions are typer's, whichever click is installed

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException, SystemExit, KeyboardInterrupt):
            raise
        except EXPECTED as e:
            if debug:
                raise
            report(user_message(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as e:  # noqa: BLE001 - the boundary: a bug, said in one line
            if debug:
                raise
            report(f"internal error ({type(e).__name__}: {user_message(e)}); this is a bug: "
                   "please report it with the output of the same command run as `sphinx-edge --debug ...`")
            raise typer.Exit(EXIT_BUG) from None

    return wrapper  # type: ignore[return-value]
