"""Files a user hands us or gets back: writes that a crash or a bad argument can never leave
half-done (nor lose the file they replace), and torch files read so that no code in them runs."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError


def _check_parent(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable; choose another path")


def check_writable_target(path: str | os.PathLike) -> Path:
    """Fail early, in one line, when `path` cannot be written (before any work is done)."""
    path = Path(path)
    _check_parent(path)
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
        _open_like_new_files(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder_target(path: str | os.PathLike, replaceable: tuple[str, ...]) -> Path:
    """Fail early when folder `path` cannot be written. An existing folder is only replaced when
    it holds one of the `replaceable` marker files (a model folder we may overwrite), so a typo
    never deletes someone's data."""
    path = Path(path)
    _check_parent(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder name")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in replaceable):
        raise UserError(f"{path} is a folder that holds other things; choose a new folder name")
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike, replaceable: tuple[str, ...] = ()):
    """Yield a temp folder beside `path`; it becomes `path` only if the block succeeds. A folder
    already at `path` is moved aside first and deleted once the new one is in place (restored if
    the swap fails), so `path` is always either the old folder or the complete new one."""
    path = check_writable_folder_target(path, replaceable)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        _open_like_new_files(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:  # the swap failed part-way: put the old folder back
            if (old / path.name).exists() and not path.exists():
                os.replace(old / path.name, path)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _open_like_new_files(target: Path) -> None:
    """mkstemp / mkdtemp make private files (0600) and folders (0700); give a temp file, or a
    temp folder and all it holds, the modes a plain open / mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [target, *(target.rglob("*") if target.is_dir() else [])]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def read_torch_file(path: Path) -> object:
    """`torch.load` with weights_only=True: plain data and tensors only, no code ever runs.
    Every failure is one line that says what the file is not."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:  # a pickle that names code to run: refused before anything ran
            raise UserError(f"{path} holds Python objects that safe loading refuses "
                            f"({refused.group(1)}); it is not a plain model file — do not load "
                            "files you don't trust") from None
        raise UserError(f"{path} is not a readable model file (truncated or corrupt)") from None
    # what torch.load raised on 1,500 truncated, bit-flipped and random files (zip, legacy and
    # plain pickles): the unpickler's own error, the zip reader's RuntimeError, and the errors of
    # reading past a short buffer (EOF, struct, index, a memo key, bad UTF-8 — a ValueError)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError,
            KeyError, struct.error) as e:
        raise UserError(f"{path} is not a readable model file (truncated or corrupt: "
                        f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
