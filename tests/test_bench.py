"""`fastddpm bench` and fastddpm.timing: what is timed is the real sampler — its steps, its batch,
the backend named — over `--repeats` runs after one warm-up, and the median reported is those
runs' median; bad arguments end in one line."""
import json
from types import SimpleNamespace

import pytest
import torch
from tiny import TINY, save_tiny, tiny_model

import fastddpm.commands.bench as bench_command
from fastddpm import backends, timing
from fastddpm.backends import Backend
from fastddpm.cli import main
from fastddpm.options import DEFAULT_SAMPLER, MAX_BATCH, SamplingOptions
from fastddpm.runtime import Sampler, sample
from fastddpm.schedule import ScheduleConfig


@pytest.fixture
def counting_backend(monkeypatch):
    """A backend named "counting": the eager U-Net's ε, recording (batch, timesteps) of every
    call. Registered for this test only."""
    calls = []
    eager = backends.get_backend("torch")

    def make(model, device, dtype, threads):
        denoise = eager.make(model, device, dtype, threads)

        def counted(x, t):
            calls.append((x.shape[0], t.tolist()))
            return denoise(x, t)

        return counted

    monkeypatch.setitem(backends._registry, "counting", Backend("counting", make, graph_capturable=True))
    return calls


@pytest.fixture
def samplers_made(monkeypatch):
    """Every Sampler the bench command builds, in order."""
    made = []

    class Recorded(Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bench_command, "Sampler", Recorded)
    return made


def test_time_sampler_is_the_median_of_the_timed_runs_of_the_real_sampler(monkeypatch):
    """A fake clock that moves only when a run ends: the warm-up's 100 s must not count, and
    the median of the five timed runs (5, 1, 3, 2, 10) is 3 exactly (their mean: 4.2)."""
    model = tiny_model(TINY, ScheduleConfig("linear", 20))
    sampler = Sampler(model, sampler="ddim", steps=4, device="cpu", dtype="fp32")
    durations = iter([100.0, 5.0, 1.0, 3.0, 2.0, 10.0])
    now = [0.0]
    runs = []
    real_run = sampler.run

    def timed_run(seed, first, batch, **kwargs):
        out = real_run(seed, first, batch, **kwargs)
        runs.append(((seed, first, batch), out))
        now[0] += next(durations)
        return out

    monkeypatch.setattr(sampler, "run", timed_run)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    result = timing.time_sampler(sampler, batch=3, repeats=5)
    assert result == {"median_s": 3.0, "min_s": 1.0, "images_per_s": 1.0, "ms_per_step": 750.0,
                      "steps": 4, "batch": 3, "repeats": 5}
    # one warm-up, then `repeats` full runs of the batch, seeds 0..4
    assert [args for args, _ in runs] == [(0, 0, 3)] + [(r, 0, 3) for r in range(5)]
    # each run is the whole chain `sample` draws with these options
    for (seed, _, _), out in runs[1:3]:
        want = sample(model, num=3, seed=seed, sampler="ddim", steps=4, device="cpu", dtype="fp32")
        torch.testing.assert_close(out.clamp(-1, 1), want, rtol=0, atol=0)


def test_each_backend_named_is_timed_on_a_sampler_of_its_own(tmp_path, capsys, counting_backend,
                                                             samplers_made):
    model = save_tiny(tmp_path / "m.pt", TINY)
    code = main(["bench", "--model", str(model), "--device", "cpu", "--sampler", "ddim",
                 "--steps", "3", "--batch-size", "2", "--repeats", "2", "--backends", "torch,counting",
                 "--json"])
    assert code == 0
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["backend"] for r in results] == ["torch", "counting"]
    want = SamplingOptions(sampler="ddim", steps=3, device="cpu", batch_size=2, backend="torch")
    assert [s.options for s in samplers_made] == [want, want.replace(backend="counting")]
    for result in results:
        assert (result["device"], result["dtype"], result["sampler"]) == ("cpu", "fp32", "ddim")
        assert (result["steps"], result["batch"], result["repeats"]) == (3, 2, 2)
        assert result["median_s"] >= result["min_s"] > 0
        assert result["images_per_s"] == pytest.approx(2 / result["median_s"], rel=1e-12)
        assert result["ms_per_step"] == pytest.approx(1e3 * result["median_s"] / 3, rel=1e-12)
    # the second sampler ran on the second backend: warm-up + 2 timed runs, 3 steps each, batch 2,
    # at the DDIM table's timesteps (the first sampler never called it)
    timesteps = samplers_made[1].table.timesteps.tolist()
    assert counting_backend == [(2, [t, t]) for t in timesteps] * 3


def test_without_sampling_flags_bench_times_the_sampling_defaults(tmp_path, capsys,
                                                                  counting_backend, samplers_made):
    """Was: its own defaults (DDIM, 50 steps, batch 16). Now SamplingOptions': the default
    sampler at its default steps for a model without a tuned grid (all T = 4 here, as
    min(SAFE_STEPS, T)), batches of MAX_BATCH."""
    model = save_tiny(tmp_path / "m.pt", TINY, ScheduleConfig("linear", 4))
    assert main(["bench", "--model", str(model), "--device", "cpu", "--backend", "counting",
                 "--repeats", "1", "--json"]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert (result["backend"], result["sampler"], result["steps"], result["batch"]) == \
        ("counting", DEFAULT_SAMPLER, 4, MAX_BATCH)
    assert [s.options for s in samplers_made] == [SamplingOptions(device="cpu", backend="counting")]
    assert counting_backend == [(MAX_BATCH, [t] * MAX_BATCH) for t in (3, 2, 1, 0)] * 2


@pytest.mark.parametrize("argv,message", [
    (["--backends", "torch,jax"], "jax"),
    (["--backends", " , "], "names no backend"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--sampler", "ddpm", "--eta", "0.5"], "η is a DDIM option"),
])
def test_bench_bad_arguments(tiny_model_file, capsys, samplers_made, argv, message):
    code = main(["bench", "--model", str(tiny_model_file), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert samplers_made == []  # refused before anything is built


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


def test_cpu_rounds_report_the_median_of_per_round_speedups():
    """benchmarks/bench_sampler.py cpu --rounds: a row is the median of its rounds, and its
    speed-up the median of each round's ratio to diffusers (here 4×, where the ratio of the
    medians would say 2×); an engine refused in every round keeps its one-line reason."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_sampler.py"
    spec = importlib.util.spec_from_file_location("bench_sampler", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(impl, round_, ms):
        return {"case": "c", "impl": impl, "round": round_, "ms_per_step": ms, "ms_per_step_min": ms - 1,
                "first_run_s": round_ + 1.0, "engine": impl}

    runs = [run("diffusers", 0, 10.0), run("ov", 0, 10.0), run("diffusers", 1, 100.0), run("ov", 1, 25.0),
            run("diffusers", 2, 20.0), run("ov", 2, 5.0),
            *({"case": "c", "impl": "ort-bf16", "round": r, "error": "no bf16 kernels"} for r in range(3))]
    rows = {r["impl"]: r for r in bench.per_engine(runs)}
    assert rows["ov"]["speedup"] == 4.0 and rows["diffusers"]["speedup"] == 1.0
    assert (rows["ov"]["ms_per_step"], rows["ov"]["ms_per_step_min"], rows["ov"]["rounds"]) == (10.0, 4.0, 3)
    assert rows["ov"]["first_run_s"] == 2.0
    assert rows["ort-bf16"]["error"] == "no bf16 kernels"
