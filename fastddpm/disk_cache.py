"""The on-disk cache of converted models (OpenVINO IR, exported ONNX): a fresh process skips the
conversion its engine would otherwise redo.

An entry is a flat folder named by its kind and a hash of its key (the model's content hash and
the versions of whatever produced it), holding its files and `manifest.json` (the key and the
SHA-256 of every file). It is written into a temp folder beside its place and renamed there
whole, so a reader sees a complete entry or none. An entry whose manifest is missing, unreadable,
of another key, or whose files do not hash as listed is removed and rebuilt. Where the folder
cannot be written (read-only, a file in the way) one warning says so and the run goes on with
what it converted in memory.

The folder: $FASTDDPM_CACHE, else $XDG_CACHE_HOME/fastddpm, else ~/.cache/fastddpm.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
_warned: set[Path] = set()  # folders already warned about: one warning per folder and process


def cache_root() -> Path:
    if os.environ.get("FASTDDPM_CACHE"):
        return Path(os.environ["FASTDDPM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastddpm"


def _entry(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / f"{kind}-{digest}"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: _file_hash(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}


def _discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # a folder we cannot remove is rebuilt in memory


def _warn_unwritable(root: Path, error: OSError) -> None:
    if root not in _warned:
        _warned.add(root)
        warnings.warn(f"fastddpm cannot write its engine cache in {root} ({error.strerror or error}): "
                      "converted models are kept in memory only; set FASTDDPM_CACHE to a writable "
                      "folder", stacklevel=3)


def load(kind: str, key: dict) -> Path | None:
    """The folder of a complete, intact entry for `key`, or None (a broken one is removed)."""
    folder = _entry(kind, key)
    if not folder.is_dir():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        intact = (isinstance(manifest, dict) and manifest.get("key") == key
                  and manifest.get("files") == _hashes(folder))
    except (OSError, ValueError):  # no manifest, unreadable files, not JSON
        intact = False
    if not intact:
        _discard(folder)
        return None
    return folder


def store(kind: str, key: dict, write: Callable[[Path], None]) -> Path | None:
    """`write(folder)` fills a new entry for `key`; returns its final folder, or None (after one
    warning) where the cache cannot be written."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as e:
        _warn_unwritable(root, e)
        return None
    try:
        write(staging)
        (staging / MANIFEST).write_text(json.dumps({"key": key, "files": _hashes(staging)}))
        final = _entry(kind, key)
        _discard(final)  # a broken entry, or one a concurrent process just wrote (the same bytes)
        try:
            os.rename(staging, final)
        except OSError:
            if load(kind, key) is None:  # not another writer's complete entry: a real failure
                raise
        return final
    except OSError as e:
        _warn_unwritable(root, e)
        return None
    finally:
        _discard(staging)  # gone already when renamed
