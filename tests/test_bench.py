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


def test_benchmark_summary_reports_speedups_over_the_peer():
    """benchmarks/summarize.py: peer time / own time within a group, GPU ms where recorded."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "summarize.py"
    spec = importlib.util.spec_from_file_location("summarize", path)
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def row(name, group, impl, ms=None, host_s=1.0):
        info = {"impl": impl} | ({"ms": ms} if ms is not None else {})
        return {"name": name, "group": group, "extra_info": info, "stats": {"median": host_s}}

    benches = [row("k-fused", "gn", "fused", ms=0.5), row("k-eager", "gn", "eager", ms=2.0),
               row("s-ours", "sampling", "fastddpm", host_s=0.25), row("s-peer", "sampling", "diffusers"),
               row("lone", "other", "fused", ms=1.0)]
    assert summarize.speedups(benches) == {"k-fused": 4.0, "k-eager": 1.0, "s-ours": 4.0, "s-peer": 1.0}
    lines = summarize.table(benches).splitlines()
    assert lines[2].startswith("| k-fused | fused | 0.5 | 4 |")
    assert lines[-1].startswith("| lone | fused | 1 |  |")
