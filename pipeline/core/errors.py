"""User-facing errors: one clear line, never a stack trace from deep inside a library.

Anything a user can cause (bad data, bad config, a missing parent stage) raises `UserError`.
Stage entry points are wrapped in `friendly`, which prints the message on one line and exits 2.
"""

from __future__ import annotations

import atexit
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
        _register_teardown()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def _close_process_group() -> None:
    """Under `accelerate launch`, close the process group before the interpreter exits: gloo's threads left to C++
    static destructors can abort a finished process ("terminate called without an active exception"). At exit,
    not after each call, so that a Hydra -m sweep keeps its group between jobs. A process that never imported
    torch has no group, and importing it this late fails ("can't register atexit after shutdown")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_registered = False


def _register_teardown() -> None:
    """Registered when an entry point starts (not on import: a library user decides about their own group)."""
    global _registered
    if not _registered:
        atexit.register(_close_process_group)
        _registered = True
