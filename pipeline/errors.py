"""User-facing errors: one clear line, never a stack trace from deep inside a library.

Anything a user can cause (bad data, bad config, a missing parent stage) raises `UserError`.
Stage entry points run under `run_main`, which prints the message on one line and exits 2.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error the user can fix. The message must say what is wrong and where (file, line, key or command)."""


def data_error(path, line: int | None, field: str | None, problem: str) -> UserError:
    """Uniform message for bad records: `file:line: field 'x': problem`."""
    where = str(path) + (f":{line}" if line is not None else "")
    what = f"field '{field}': " if field else ""
    return UserError(f"{where}: {what}{problem}")


def friendly(fn):
    """Decorator for stage `main`s: UserError -> one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
