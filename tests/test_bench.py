"""`fastddpm bench`: runs, reports coherent figures, refuses bad arguments in one line."""
import json

from fastddpm import checkpoint
from fastddpm.cli import main
from fastddpm.model import DiffusionModel
from fastddpm.unet import UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(), groups=4, dropout=0.0)


def test_bench_reports_per_backend(tmp_path, capsys):
    checkpoint.save(DiffusionModel.create(TINY), tmp_path / "m.pt")
    code = main(["bench", "--model", str(tmp_path / "m.pt"), "--device", "cpu", "--steps", "3",
                 "--batch-size", "2", "--repeats", "2", "--json"])
    assert code == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert result["backend"] == "torch" and result["steps"] == 3 and result["batch"] == 2
    assert result["median_s"] >= result["min_s"] > 0
    assert abs(result["images_per_s"] - 2 / result["median_s"]) < 1e-9


def test_bench_bad_backend(tmp_path, capsys):
    checkpoint.save(DiffusionModel.create(TINY), tmp_path / "m.pt")
    code = main(["bench", "--model", str(tmp_path / "m.pt"), "--backends", "torch,jax"])
    err = capsys.readouterr().err
    assert code == 2 and "jax" in err and err.count("\n") == 1
