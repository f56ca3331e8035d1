"""Files a user hands us or gets back: writes that a crash or a bad argument can never leave
half-done (nor lose the file they replace), and torch files read so that no code in them runs."""
from __future__ import annotations

import json
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
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{parent} is a file, not a folder; choose another output path")
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


# Every folder fastddpm writes holds this file: the names of the files it wrote there. An
# existing folder is replaced only when it holds exactly those files, so a typo in a path never
# deletes someone's data (a diffusers folder of their own, a folder of photos).
FOLDER_MARKER = ".fastddpm-written"


def _written_by_us(folder: Path) -> bool:
    try:
        listed = json.loads((folder / FOLDER_MARKER).read_text())
    except (OSError, ValueError):  # no marker, unreadable, or not JSON
        return False
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                     if p.is_file() and p.name != FOLDER_MARKER)
    return isinstance(listed, list) and sorted(map(str, listed)) == present


def check_writable_folder_target(path: str | os.PathLike) -> Path:
    """Fail early when folder `path` cannot be written. An existing non-empty folder may only be
    replaced when fastddpm wrote it and nothing else was added since (FOLDER_MARKER)."""
    path = Path(path)
    if not str(path) or path.resolve() == Path.cwd().resolve():
        raise UserError("the output folder is the current folder; give a new folder name")
    _check_parent(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder name")
    if path.is_dir() and any(path.iterdir()) and not _written_by_us(path):
        raise UserError(f"{path} holds files fastddpm did not write; choose a new folder name "
                        "(nothing was changed)")
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temp folder beside `path`; it becomes `path` only if the block succeeds. A folder
    already at `path` (one fastddpm wrote: check_writable_folder_target) is moved aside first and
    deleted once the new one is in place (restored if the swap fails), so `path` is always
    either the old folder or the complete new one."""
    path = check_writable_folder_target(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / FOLDER_MARKER).write_text(json.dumps(written))
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


def refuse_overwriting_inputs(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """A one-line error when the output path is (or lies inside) one of the inputs: an export or
    conversion must never replace the file it reads."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if target == source or source in target.parents:
            raise UserError(f"the output {out} would overwrite the input {given}; "
                            "choose another output path")


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
