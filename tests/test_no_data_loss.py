"""No command replaces what it did not write: folders are swapped in only over a folder that
fastddpm wrote and nobody changed since (its marker lists the files), and no output may land
on an input. Each refusal is one line, exit 2, with every byte of the user's files unchanged."""
import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.files import FOLDER_MARKER, atomic_folder, check_writable_folder_target


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what earlier commands printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("marker", ["config.json", "model_index.json"])
def test_convert_keeps_a_diffusers_looking_folder_it_did_not_write(tmp_path, capsys, marker):
    """The old rule replaced any folder holding a config.json or model_index.json."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / marker).write_text("{}")
    (mine / "photo.jpg").write_bytes(b"\xff\xd8 precious")
    before = _snapshot(mine)
    err = _refused(capsys, ["convert", "default", "--to", "diffusers", "-o", str(mine)])
    assert "did not write" in err
    assert _snapshot(mine) == before


def test_convert_replaces_its_own_folder_until_someone_adds_a_file(tmp_path, capsys):
    out = tmp_path / "conv"
    assert main(["convert", "default", "--to", "diffusers", "-o", str(out)]) == 0
    written = json.loads((out / FOLDER_MARKER).read_text())
    assert sorted(written) == sorted(p.name for p in out.iterdir() if p.name != FOLDER_MARKER)
    assert main(["convert", "default", "--to", "diffusers", "-o", str(out)]) == 0  # ours: replaced
    (out / "notes.txt").write_text("mine now")
    before = _snapshot(out)
    _refused(capsys, ["convert", "default", "--to", "diffusers", "-o", str(out)])
    assert _snapshot(out) == before


def test_export_refuses_to_write_over_its_model(tmp_path, capsys):
    model = tmp_path / "m.pt"
    assert main(["convert", "default", "-o", str(model)]) == 0
    before = model.read_bytes()
    err = _refused(capsys, ["export", str(model), "-o", str(model)])
    assert "overwrite the input" in err
    assert model.read_bytes() == before


def test_convert_and_sample_refuse_to_write_over_their_inputs(tmp_path, capsys):
    model = tmp_path / "m.pt"
    assert main(["convert", "default", "-o", str(model)]) == 0
    before = model.read_bytes()
    _refused(capsys, ["convert", str(model), "-o", str(model)])
    images = tmp_path / "in.npz"
    assert main(["sample", "--num", "2", "--steps", "2", "--sampler", "ddim", "--device", "cpu",
                 "--no-progress", "--out", str(images)]) == 0
    images_before = images.read_bytes()
    _refused(capsys, ["sample", "--from", str(images), "--steps", "2", "--sampler", "ddim",
                      "--out", str(images)])
    assert model.read_bytes() == before and images.read_bytes() == images_before


def test_sample_folder_output_is_swapped_in_whole(tmp_path):
    out = tmp_path / "imgs"
    args = ["sample", "--steps", "2", "--sampler", "ddim", "--device", "cpu", "--no-progress",
            "--out", f"{out}/"]
    assert main([*args, "--num", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MARKER, "000000.png", "000001.png",
                                                     "000002.png"]
    assert main([*args, "--num", "2"]) == 0  # a second run: no stale third image
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MARKER, "000000.png", "000001.png"]
    assert not list(tmp_path.glob(".imgs.*"))  # no temp folder left beside it


@pytest.mark.parametrize("out", ["", "./", "{tmp}/afile.txt/x.png"])
def test_sample_bad_output_paths_fail_before_sampling(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("keep")
    _refused(capsys, ["sample", "--out", out.format(tmp=tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_a_failed_build_leaves_the_old_folder(tmp_path):
    out = tmp_path / "conv"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("the build failed")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


names = st.text(string.ascii_lowercase + string.digits + "._-", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..", FOLDER_MARKER))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(written=st.lists(names, min_size=1, max_size=4, unique=True),
       added=st.lists(names, max_size=3, unique=True), removed=st.booleans(),
       bad_marker=st.sampled_from([None, "not json", '{"a": 1}', "[1, 2]"]))
def test_only_an_untouched_folder_of_ours_is_replaceable(tmp_path_factory, written, added,
                                                         removed, bad_marker):
    """Whatever a folder holds, it counts as replaceable exactly when its marker lists its files."""
    folder = tmp_path_factory.mktemp("f") / "out"
    with atomic_folder(folder) as tmp:
        for name in written:
            (tmp / name).write_text(name)
    extra = [n for n in added if n not in written]
    for name in extra:
        (folder / name).write_text("user's")
    if removed:
        (folder / written[0]).unlink()
    if bad_marker is not None:
        (folder / FOLDER_MARKER).write_text(bad_marker)
    untouched = not extra and not removed and bad_marker is None
    before = _snapshot(folder)
    if untouched or not any(folder.iterdir()):
        assert check_writable_folder_target(folder) == folder
    else:
        with pytest.raises(UserError):
            check_writable_folder_target(folder)
    assert _snapshot(folder) == before
