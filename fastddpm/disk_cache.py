"""The on-disk cache of converted models (OpenVINO IR, exported ONNX): a fresh process skips the
conversion its engine would otherwise redo.

An entry is a flat folder named by its kind and a hash of its key (the model's content hash and
the versions of whatever produced it), holding its files and `manifest.json` (the key and the
SHA-256 of every file). It is written into a temp folder beside its place and renamed there
whole, so a reader sees a complete entry or none. An entry whose manifest is missing, unreadable,
of another key, or whose files do not hash as listed is removed and rebuilt. Where the folder
cannot be written (read-only, a file in the way) one warning says so and the run goes on with
what it converted in memory.

The entries are bounded: after each store the least recently used ones (reading an entry counts
as a use) are removed until all of them together take at most $FASTDDPM_CACHE_MAX_GB GiB
(default DEFAULT_MAX_GB; `inf` for no bound). Why: every new model, and every new version of
fastddpm or of an engine, makes new entries (a CIFAR-10 U-Net's IR is 143 MB), and nothing else
would ever remove the old ones. Entries written or read in the last RECENT_S seconds stay (the one
just stored, and those another process may be loading); staging folders that a killed process
left (older than STALE_STAGING_S) go too.

The folder: $FASTDDPM_CACHE, else $XDG_CACHE_HOME/fastddpm, else ~/.cache/fastddpm.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"
ENTRY_NAME = re.compile(r"[a-z0-9-]+-[0-9a-f]{32}")  # `_entry`'s names: other folders are not ours to evict
DEFAULT_MAX_GB = 5.0
RECENT_S = 60.0
STALE_STAGING_S = 86400.0  # a staging folder this old was left by a killed process
_warned: set[Path] = set()  # folders already warned about: one warning per folder and process


def cache_root() -> Path:
    if os.environ.get("FASTDDPM_CACHE"):
        return Path(os.environ["FASTDDPM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastddpm"


def max_bytes() -> float:
    """The bound on all entries together, from $FASTDDPM_CACHE_MAX_GB (GiB)."""
    raw = os.environ.get("FASTDDPM_CACHE_MAX_GB", "").strip()
    if not raw:
        return DEFAULT_MAX_GB * 2**30
    try:
        gib = float(raw)
    except ValueError:
        gib = float("nan")
    if not gib > 0:
        raise UserError("FASTDDPM_CACHE_MAX_GB must be a positive number of GiB (inf: no bound), "
                        f"got {raw!r}")
    return gib * 2**30


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
    max_bytes()  # a bad bound is refused here, before a miss makes the caller convert
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
    with contextlib.suppress(OSError):  # in a read-only folder the order of use stays as it was
        os.utime(folder / MANIFEST)  # the manifest's mtime is the entry's last use
    return folder


def store(kind: str, key: dict, write: Callable[[Path], None]) -> Path | None:
    """`write(folder)` fills a new entry for `key`; returns its final folder, or None (after one
    warning) where the cache cannot be written."""
    root, limit = cache_root(), max_bytes()
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
        _evict(root, limit)
        return final
    except OSError as e:
        _warn_unwritable(root, e)
        return None
    finally:
        _discard(staging)  # gone already when renamed


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, folder) of each entry in `root`, least recently used first."""
    found = []
    for folder in root.iterdir():
        if not ENTRY_NAME.fullmatch(folder.name):
            continue
        try:
            used = (folder / MANIFEST).stat().st_mtime
            found.append((used, sum(p.stat().st_size for p in folder.iterdir()), folder))
        except OSError:  # no manifest yet, or removed by another process meanwhile
            continue
    return sorted(found)


def _evict(root: Path, limit: float) -> None:
    """Remove the least recently used entries of `root` until they take at most `limit` bytes,
    sparing those used in the last RECENT_S seconds; and stale staging folders."""
    now = time.time()
    for staging in root.glob(".staging-*"):
        with contextlib.suppress(OSError):
            if now - staging.stat().st_mtime > STALE_STAGING_S:
                _discard(staging)
    entries = _entries(root)
    total = sum(size for _, size, _ in entries)
    for used, size, folder in entries:
        if total <= limit:
            return
        if now - used >= RECENT_S:
            _discard(folder)
            total -= size
