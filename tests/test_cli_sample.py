"""`fastddpm sample`: outputs, and every bad input ends in one line, exit code 2, nothing written."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_RGB, save_tiny

from fastddpm import checkpoint, images, paper
from fastddpm.cli import main
from fastddpm.runtime import sample
from fastddpm.schedule import ScheduleConfig


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """3 channels: the PNGs and arrays are in colour."""
    return save_tiny(tmp_path_factory.mktemp("model") / "model.pt", TINY_RGB, ScheduleConfig("linear", 50))


def _run(capsys, *argv):
    code = main(["sample", *argv, "--no-progress"])
    err = capsys.readouterr().err
    return code, err


def test_writes_a_png_grid(model_path, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, err = _run(capsys, "--model", str(model_path), "--num", "6", "--steps", "5", "--out", str(out))
    assert code == 0, err
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 2 * 10, 2 + 3 * 10, 3)  # 3 per row, 8 px tiles + 2 px padding
    # the images `sample` draws with the same seed (0) and the defaults, tile by tile
    want = sample(checkpoint.load(model_path), num=6, steps=5)
    np.testing.assert_array_equal(_tiles(img, 2, 3).reshape(6, 8, 8, 3), images.to_uint8(want))
    assert img[2:10, 2:10].std() > 0  # a real image in the first tile


def test_writes_npz_and_folder(model_path, tmp_path, capsys):
    code, err = _run(capsys, "--model", str(model_path), "--num", "3", "--steps", "4",
                     "--sampler", "ddim", "--out", str(tmp_path / "x.npz"))
    assert code == 0, err
    arr = np.load(tmp_path / "x.npz")["images"]
    assert arr.shape == (3, 8, 8, 3) and arr.dtype == np.uint8
    want = sample(checkpoint.load(model_path), num=3, steps=4, sampler="ddim")
    np.testing.assert_array_equal(arr, images.to_uint8(want))
    code, err = _run(capsys, "--model", str(model_path), "--num", "3", "--steps", "4",
                     "--sampler", "ddim", "--out", str(tmp_path / "pngs") + "/")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "pngs").glob("*.png"))
    assert files == ["000000.png", "000001.png", "000002.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / "000001.png")), arr[1])


def test_progressive_grid_rows_are_images_ending_in_the_sample(model_path, tmp_path, capsys):
    args = ["--model", str(model_path), "--num", "3", "--steps", "6", "--sampler", "ddim",
            "--eta", "0.5", "--seed", "4"]
    code, err = _run(capsys, *args, "--progressive", "4", "--out", str(tmp_path / "prog.png"))
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "prog.png"))
    assert grid.shape == (2 + 3 * 10, 2 + 4 * 10, 3)  # a row per image, a column per snapshot
    code, err = _run(capsys, *args, "--out", str(tmp_path / "final.npz"))
    assert code == 0, err
    final = np.load(tmp_path / "final.npz")["images"]
    want = paper.progressive(checkpoint.load(model_path), num=3, snapshots=4, seed=4, steps=6,
                             sampler="ddim", eta=0.5)
    tiles = _tiles(grid, 3, 4)  # a row per image, a column per snapshot
    np.testing.assert_array_equal(tiles, images.to_uint8(want.flatten(0, 1)).reshape(4, 3, 8, 8, 3)
                                  .transpose(1, 0, 2, 3, 4))
    for k in range(3):  # the last column is the sample itself, same seed and options
        np.testing.assert_array_equal(grid[2 + 10 * k:10 + 10 * k, 32:40], final[k])
    assert not np.array_equal(grid[2:10, 2:10], final[0])  # the first snapshot is not it yet


@pytest.mark.parametrize("extra,message", [  # the last --out / --progressive given counts
    (["--out", "{tmp}/x.npz"], "end --out in .png"),
    (["--batch-size", "2"], "drop --batch-size"),
    (["--progressive", "0"], "snapshots must be between 1 and 6"),
])
def test_progressive_bad_input(model_path, tmp_path, capsys, extra, message):
    argv = ["--model", str(model_path), "--steps", "6", "--progressive", "3",
            "--out", str(tmp_path / "p.png"), *(a.format(tmp=tmp_path) for a in extra)]
    code, err = _run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _image_folder(tmp_path, count):
    """`count` random 8×8 RGB PNGs (uint8, so they survive the round trip through [−1, 1])."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    pixels = np.random.default_rng(7).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder, pixels


def _tiles(grid, rows, cols):
    """The 8 px tiles of a PNG grid (2 px padding), as (rows, cols, 8, 8, 3)."""
    return np.stack([np.stack([grid[2 + 10 * r:10 + 10 * r, 2 + 10 * c:10 + 10 * c]
                               for c in range(cols)]) for r in range(rows)])


def test_from_images_reconstructs_as_paper_does(model_path, tmp_path, capsys):
    folder, pixels = _image_folder(tmp_path, 3)
    args = ["--model", str(model_path), "--from", str(folder), "--t", "30", "--steps", "10",
            "--sampler", "ddpm", "--seed", "5"]
    code, err = _run(capsys, *args, "--out", str(tmp_path / "rec.npz"))
    assert code == 0, err
    got = np.load(tmp_path / "rec.npz")["images"]
    x0 = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = paper.reconstruct(checkpoint.load(model_path), x0, 30, seed=5, steps=10, sampler="ddpm",
                             device="cpu")
    np.testing.assert_array_equal(got, images.to_uint8(want))
    code, err = _run(capsys, *args, "--out", str(tmp_path / "rec.png"))
    assert code == 0, err
    tiles = _tiles(np.asarray(Image.open(tmp_path / "rec.png")), 3, 2)
    np.testing.assert_array_equal(tiles[:, 0], pixels)  # a row per image: the image, ...
    np.testing.assert_array_equal(tiles[:, 1], got)  # ... then its reconstruction
    assert not np.array_equal(got, pixels)


def test_from_images_interpolates_pairs_as_paper_does(model_path, tmp_path, capsys):
    folder, pixels = _image_folder(tmp_path, 5)  # two pairs; the fifth image has no partner
    args = ["--model", str(model_path), "--from", str(folder), "--interpolate", "3", "--t", "40",
            "--steps", "10", "--sampler", "ddim", "--eta", "1", "--seed", "2"]
    code, err = _run(capsys, *args, "--out", str(tmp_path / "mix.npz"))
    assert code == 0, err
    got = np.load(tmp_path / "mix.npz")["images"]
    assert got.shape == (2 * 3, 8, 8, 3)  # pair-major: pair 0's three mixes, then pair 1's
    x0 = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = paper.interpolate(checkpoint.load(model_path), x0[0:4:2], x0[1:4:2], [0.0, 0.5, 1.0], 40,
                             seed=2, steps=10, sampler="ddim", eta=1.0, device="cpu")
    np.testing.assert_array_equal(got, images.to_uint8(want.transpose(0, 1).flatten(0, 1)))
    code, err = _run(capsys, *args, "--out", str(tmp_path / "mix.png"))
    assert code == 0, err
    tiles = _tiles(np.asarray(Image.open(tmp_path / "mix.png")), 2, 5)
    np.testing.assert_array_equal(tiles[:, 0], pixels[[0, 2]])  # a row per pair: a, ...
    np.testing.assert_array_equal(tiles[:, 1:4].reshape(got.shape), got)  # ... the mixes, ...
    np.testing.assert_array_equal(tiles[:, 4], pixels[[1, 3]])  # ... b


@pytest.mark.parametrize("extra,message", [
    (["--t", "10"], "add --from IMAGES"),
    (["--interpolate", "3"], "add --from IMAGES"),
    (["--from", "{folder}", "--progressive", "3"], "drop --from"),
    (["--from", "{folder}", "--interpolate", "1"], "at least 2 weights"),
    (["--from", "{folder}/00.png", "--interpolate", "3"], "at least 2 images"),
    (["--from", "{folder}", "--t", "50"], "start timestep must be in [0, 50)"),
    (["--from", "{folder}", "--batch-size", "2"], "drop --batch-size"),
    (["--from", "{folder}", "--num", "0"], "num must be positive"),
    (["--from", "{tmp}/absent"], "not found"),
])
def test_from_images_bad_input(model_path, tmp_path, capsys, extra, message):
    folder, _ = _image_folder(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--model", str(model_path), "--steps", "5", "--out", str(out / "x.png"),
            *(a.format(tmp=tmp_path, folder=folder) for a in extra)]
    code, err = _run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(out.iterdir()) == []


def _bad_model_files(tmp_path, model_path):
    data = model_path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.pt").write_text("not a model")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    return {"missing": tmp_path / "absent.pt", "truncated": tmp_path / "cut.pt",
            "text": tmp_path / "text.pt", "foreign": tmp_path / "foreign.pt"}


@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "foreign"])
def test_bad_model_files(model_path, tmp_path, capsys, kind):
    bad = _bad_model_files(tmp_path, model_path)[kind]
    out = tmp_path / "out.png"
    code, err = _run(capsys, "--model", str(bad), "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps must be positive"),
    (["--steps", "51"], "steps must be between 1 and 50"),
    (["--num", "0"], "num must be positive"),
    (["--num", "-4"], "num must be positive"),
    (["--sampler", "euler"], "invalid choice"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda:7"], "cuda"),
    (["--sampler", "ddim", "--eta", "1.5"], "eta must be in"),
    (["--sampler", "ddim", "--eta", "-0.5"], "eta must be in"),
    (["--batch-size", "0"], "batch size must be positive"),
    (["--num", "many"], "invalid int value"),
])
def test_bad_arguments(model_path, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    try:
        code, err = _run(capsys, "--model", str(model_path), "--out", str(out), *args)
    except SystemExit as e:  # argparse's own refusals
        code, err = e.code, capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("target,message", [("no/such/dir/out.png", "does not exist"),
                                            ("out.gif", "cannot tell the output format")])
def test_bad_output_paths(model_path, tmp_path, capsys, target, message):
    code, err = _run(capsys, "--model", str(model_path), "--out", str(tmp_path / target))
    assert code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_when_sampling_fails(model_path, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"an earlier grid")
    code, _ = _run(capsys, "--model", str(model_path), "--steps", "999", "--out", str(out))
    assert code == 2 and out.read_bytes() == b"an earlier grid"


def test_pickle_that_runs_code_never_runs(tmp_path):
    """Through the real entry point: the payload would create a file if it ever ran."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    script = (
        "import torch, os\n"
        "class P:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'format': 'fastddpm', 'state_dict': {{}}, 'x': P()}}, r'{evil}')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    proc = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--model", str(evil),
                           "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "safe loading refuses" in proc.stderr and proc.stderr.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "o.png").exists()


# what `pip install -e .` leaves out: the extras (onnx, test, train, kernels, tensorrt)
OPTIONAL = ("onnx", "onnxscript", "onnxruntime", "tensorrt", "diffusers", "sklearn", "triton",
            "pytest_benchmark")


def test_base_install_samples_and_names_the_extra_it_lacks(tmp_path):
    """The README's first command on the base install: no optional package importable (each is
    blocked in sys.modules), `fastddpm sample` still draws from the bundled model, and a command
    that needs an extra says which in one line."""
    script = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
from fastddpm.cli import main
assert main(["sample", "--num", "4", "--steps", "3", "--device", "cpu",
             "--out", {str(tmp_path / "grid.png")!r}]) == 0
codes = [main(["export", "default", "-o", {str(tmp_path / "m.onnx")!r}]),
         main(["train", "--steps", "1", "--device", "cpu", "--out", {str(tmp_path / "run")!r}]),
         main(["eval", "--num", "2", "--steps", "2", "--device", "cpu"]),
         main(["bench", "--device", "cpu", "--steps", "2", "--backends", "onnxruntime"])]
sys.exit(0 if codes == [2, 2, 2, 2] else 1)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (tmp_path / "grid.png").exists(), run.stderr[-2000:]
    # what the full install draws: the bundled model's images, same seed and options
    want = images.grid(sample("default", num=4, steps=3, device="cpu"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(want))
    assert run.returncode == 0, run.stderr[-2000:]
    assert [line for line in run.stderr.splitlines() if "error" in line] == [
        "fastddpm export: error: export needs onnx; pip install 'fastddpm[onnx]'",
        "fastddpm train: error: the built-in digits data set needs sklearn; pip install 'fastddpm[train]'",
        "fastddpm eval: error: the digits classifier needs sklearn; pip install 'fastddpm[train]'",
        "fastddpm bench: error: the onnxruntime backend needs onnx; pip install 'fastddpm[onnx]'"]
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run").exists()
