"""Writing files so that a crash or a bad argument never half-writes or loses a user's file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_writable_target(path: str | os.PathLike) -> Path:
    """Fail early, in one line, when `path` cannot be written (before any work is done)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable; choose another path")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    return path


@contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = check_writable_target(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
