"""The on-disk cache of converted models: miss → written whole with its manifest, hit → read back
(no conversion, counted) and the same ε as torch, a corrupt or stale entry rebuilt, an unwritable
folder one warning and the run goes on. Tests run as root, which ignores chmod, so "unwritable"
is a cache folder under a regular file. (The ONNX export's entry is tested in test_backend_threads,
which builds two ONNX Runtime sessions of one model anyway.)"""
import json
import os
import time
import warnings

import pytest
import torch
from tiny import TINY, tiny_model

from fastddpm import disk_cache, sessions
from fastddpm.errors import UserError

KEY = {"model": "abc", "engine": "test", "version": "1"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(disk_cache, "_warned", set())
    sessions.clear()
    yield tmp_path / "cache"
    sessions.clear()


def _write(payload: bytes):
    calls = []

    def write(folder):
        calls.append(folder)
        (folder / "graph.bin").write_bytes(payload)
        (folder / "graph.xml").write_text("<net/>")
    return write, calls


def test_folder_follows_the_environment(monkeypatch, tmp_path):
    assert disk_cache.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("FASTDDPM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert disk_cache.cache_root() == tmp_path / "xdg" / "fastddpm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert disk_cache.cache_root() == tmp_path / "home" / ".cache" / "fastddpm"


def test_miss_then_hit(cache):
    assert disk_cache.load("test", KEY) is None
    write, calls = _write(b"weights")
    folder = disk_cache.store("test", KEY, write)
    assert folder.parent == cache and (folder / "graph.bin").read_bytes() == b"weights"
    assert not [p for p in cache.iterdir() if p.name.startswith(".staging")]  # renamed, not copied
    manifest = json.loads((folder / disk_cache.MANIFEST).read_text())
    assert manifest["key"] == KEY and set(manifest["files"]) == {"graph.bin", "graph.xml"}
    assert disk_cache.load("test", KEY) == folder
    assert disk_cache.load("test", {**KEY, "version": "2"}) is None  # another engine version
    assert disk_cache.load("other", KEY) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop-file", "drop-manifest", "bad-json",
                                    "other-key", "extra-file"])
def test_corrupt_or_stale_entry_is_removed_and_rebuilt(cache, damage):
    folder = disk_cache.store("test", KEY, _write(b"weights" * 100)[0])
    manifest = folder / disk_cache.MANIFEST
    if damage == "truncate":
        (folder / "graph.bin").write_bytes(b"weig")
    elif damage == "flip":
        (folder / "graph.bin").write_bytes(b"Weights" + b"weights" * 99)
    elif damage == "drop-file":
        (folder / "graph.xml").unlink()
    elif damage == "drop-manifest":
        manifest.unlink()
    elif damage == "bad-json":
        manifest.write_text("{not json")
    elif damage == "other-key":  # a stale entry under this name
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": {"model": "x"}}))
    else:
        (folder / "stray.bin").write_bytes(b"?")
    assert disk_cache.load("test", KEY) is None
    assert not folder.exists()
    rebuilt = disk_cache.store("test", KEY, _write(b"fresh")[0])
    assert disk_cache.load("test", KEY) == rebuilt and (rebuilt / "graph.bin").read_bytes() == b"fresh"


def test_unwritable_folder_warns_once_and_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FASTDDPM_CACHE", str(blocker / "cache"))
    write, calls = _write(b"w")
    with pytest.warns(UserWarning, match="cannot write its engine cache.*FASTDDPM_CACHE"):
        assert disk_cache.store("test", KEY, write) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second one would fail here
        assert disk_cache.store("test", KEY, write) is None
        assert disk_cache.load("test", KEY) is None
    assert calls == []  # nothing converted into a folder that cannot be kept


def test_a_failing_write_leaves_no_staging_folder(cache):
    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("converter bug")

    with pytest.raises(RuntimeError, match="converter bug"):
        disk_cache.store("test", KEY, broken)
    assert list(cache.iterdir()) == []


def _last_used(folder, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(folder / disk_cache.MANIFEST, (t, t))


def test_least_recently_used_entries_go_past_the_bound(cache, monkeypatch):
    write = _write(b"w" * 1000)[0]  # ~1.2 kB an entry with its xml and manifest
    monkeypatch.setenv("FASTDDPM_CACHE_MAX_GB", str(3000 / 2**30))  # room for two
    a = disk_cache.store("test", {**KEY, "model": "a"}, write)
    _last_used(a, 300)
    b = disk_cache.store("test", {**KEY, "model": "b"}, write)
    _last_used(b, 200)
    before = (a / disk_cache.MANIFEST).stat().st_mtime
    assert disk_cache.load("test", {**KEY, "model": "a"}) == a  # a read is a use
    assert (a / disk_cache.MANIFEST).stat().st_mtime > before
    _last_used(a, 100)  # a read more recently than b, both longer ago than RECENT_S
    c = disk_cache.store("test", {**KEY, "model": "c"}, write)
    assert not b.exists() and a.exists() and c.exists()
    assert disk_cache.load("test", {**KEY, "model": "b"}) is None
    assert disk_cache.load("test", {**KEY, "model": "a"}) == a


def test_the_new_entry_and_recently_read_ones_stay_over_the_bound(cache, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE_MAX_GB", str(100 / 2**30))  # less than any one entry
    old = disk_cache.store("test", {**KEY, "model": "old"}, _write(b"w" * 1000)[0])
    recent = disk_cache.store("test", {**KEY, "model": "recent"}, _write(b"w" * 1000)[0])
    _last_used(old, 2 * disk_cache.RECENT_S)
    new = disk_cache.store("test", KEY, _write(b"w" * 1000)[0])
    assert not old.exists() and recent.exists() and new.exists()


def test_eviction_leaves_other_folders_and_removes_stale_staging(cache, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE_MAX_GB", str(100 / 2**30))
    fid = cache / "fid"
    fid.mkdir(parents=True)
    (fid / "ref-0123.npz").write_bytes(b"s" * 5000)  # FID statistics: not an entry
    stale, fresh = cache / ".staging-killed", cache / ".staging-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "eps.bin").write_bytes(b"w")
    t = time.time() - disk_cache.STALE_STAGING_S - 60
    os.utime(stale, (t, t))
    disk_cache.store("test", KEY, _write(b"w" * 1000)[0])
    assert (fid / "ref-0123.npz").exists() and fresh.exists() and not stale.exists()


@pytest.mark.parametrize("value", ["0", "-1", "lots", "nan"])
def test_a_bad_bound_is_one_line(cache, monkeypatch, value):
    monkeypatch.setenv("FASTDDPM_CACHE_MAX_GB", value)
    write, calls = _write(b"w")
    for call in (lambda: disk_cache.load("test", KEY), lambda: disk_cache.store("test", KEY, write)):
        with pytest.raises(UserError, match="FASTDDPM_CACHE_MAX_GB must be a positive number"):
            call()
    assert calls == []


def test_no_bound_keeps_everything(cache, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE_MAX_GB", "inf")
    entries = [disk_cache.store("test", {**KEY, "model": m}, _write(b"w" * 1000)[0]) for m in "abc"]
    for folder in entries:
        _last_used(folder, 1000)
    disk_cache.store("test", KEY, _write(b"w")[0])
    assert all(folder.exists() for folder in entries)


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 1, 8, 8, generator=g), torch.randint(0, 50, (3,), generator=g)


def test_openvino_ir_is_cached_and_read_back(cache, monkeypatch, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from fastddpm.export import openvino

    conversions = []
    real = openvino.convert
    monkeypatch.setattr(openvino, "convert", lambda model: conversions.append(1) or real(model))
    model = tiny_model(TINY)
    x, t = _inputs()
    with torch.inference_mode():
        want = model.unet(x, t)
    first = openvino.make(model, torch.device("cpu"), torch.float32)
    assert len(conversions) == 1 and len(list(cache.glob("openvino-*/eps.xml"))) == 1
    second = openvino.make(tiny_model(TINY), torch.device("cpu"), torch.float32)  # a new process's
    assert len(conversions) == 1  # read from the IR
    assert (second(x, t) - want).abs().max() < 1e-4 and (first(x, t) - want).abs().max() < 1e-4
    # an unwritable cache: converted in memory, one warning, same ε
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTDDPM_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="kept in memory only"):
        third = openvino.make(model, torch.device("cpu"), torch.float32)
    assert len(conversions) == 2 and (third(x, t) - want).abs().max() < 1e-4
