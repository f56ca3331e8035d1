"""backend="auto" (the default): on the CPU it picks an installed engine on the first batch of each
size and keeps it (no second build; a fresh process reads the pick from the disk cache and builds
only the winner); an engine that refuses the dtype is skipped; on CUDA it is torch, captured; its
images, and ONNX Runtime's, equal torch fp32's within 1e-4 after 20 DDIM steps; --verbose and
bench say which engine ran. No timing is asserted: which engine wins is the machine's business."""
import pytest
import torch
from tiny import TINY, tiny_model

from fastddpm import SamplingOptions, UserError, autoselect, sessions
from fastddpm.backends import Backend, _registry, get_backend, register_backend
from fastddpm.cli import main
from fastddpm.runtime import Sampler, sample

DDIM20 = dict(sampler="ddim", steps=20, spacing="leading", device="cpu", dtype="fp32")  # fp32 fakes


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTDDPM_AUTO_ENGINES", raising=False)  # conftest's: torch only
    sessions.clear()
    yield tmp_path / "cache"
    sessions.clear()


@pytest.fixture
def fakes(monkeypatch):
    """Engines 'test-other' (torch's ε by another name) and 'test-refuses' (no such dtype here)
    beside torch, timed briefly; every build counted."""
    builds = []

    def other(model, device, dtype, threads):
        builds.append("test-other")

        def denoise(x, t):
            with torch.no_grad():
                return model.unet(x, t)
        return denoise

    def refuses(model, device, dtype, threads):
        builds.append("test-refuses")
        raise UserError("this CPU has no native fp32 for test-refuses; use --dtype fp32")

    register_backend(Backend("test-other", other))
    register_backend(Backend("test-refuses", refuses))
    monkeypatch.setattr(autoselect, "CPU_ENGINES", {"test-other": (), "torch": (), "test-refuses": ()})
    monkeypatch.setattr(autoselect, "BUDGET_S", 0.05)
    real = autoselect.make_denoiser

    def counted(model, name, *args):
        if name == "torch":
            builds.append("torch")
        return real(model, name, *args)

    monkeypatch.setattr(autoselect, "make_denoiser", counted)
    yield builds
    _registry.pop("test-other")
    _registry.pop("test-refuses")


def test_engines_take_turns_when_timed():
    """One call each a round (after a warm-up call each), so load from elsewhere slows every
    engine alike; at least one round whatever the budget; a median per engine."""
    calls = []

    def engine(name):
        def denoise(x, t):
            calls.append(name)
            return x
        return denoise

    x, t = torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    times = autoselect.time_engines({n: engine(n) for n in "abc"}, x, t, budget_s=0.0)
    assert calls == list("abc") * 2 and set(times) == set("abc")
    calls.clear()
    autoselect.time_engines({n: engine(n) for n in "ab"}, x, t, budget_s=1e-4)
    assert len(calls) >= 4 and calls == list("ab") * (len(calls) // 2)  # whole rounds only


def test_auto_is_the_default():
    assert SamplingOptions().backend == "auto" and get_backend("auto") is autoselect.AUTO


def test_picks_keeps_and_remembers(fakes):
    model = tiny_model(TINY)
    sampler = Sampler(model, **{**DDIM20, "steps": 2})
    sampler.run(seed=0, first=0, batch=3)
    choice = sampler.denoise.choices[3]
    assert choice["engine"] in ("torch", "test-other") and set(choice["ms"]) == {"test-other", "torch"}
    assert "test-refuses" in choice["refused"]
    built = list(fakes)
    assert sorted(built) == ["test-other", "test-refuses", "torch"]
    sampler.run(seed=1, first=0, batch=3)  # kept: nothing built, nothing timed again
    Sampler(model, **{**DDIM20, "steps": 3}).run(seed=0, first=0, batch=3)  # the same kept engine
    assert fakes == built
    sampler.run(seed=0, first=0, batch=2)  # a new batch size is its own pick
    assert sampler.denoise.choices[2]["engine"] in ("torch", "test-other")
    # a fresh process: the pick comes from the disk cache and only the winner is built
    sessions.clear()
    fakes.clear()
    fresh = Sampler(tiny_model(TINY), **{**DDIM20, "steps": 2})
    fresh.run(seed=0, first=0, batch=3)
    assert fakes == [choice["engine"]] and fresh.denoise.choices[3]["engine"] == choice["engine"]
    assert "disk cache" in fresh.denoise.choices[3]["why"]


def test_candidates_can_be_narrowed(monkeypatch):
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "torch")
    assert autoselect.installed_engines() == ["torch"]
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "tensorflow")
    with pytest.raises(UserError, match="names no installed engine"):
        sample(tiny_model(TINY), num=1, **{**DDIM20, "steps": 1})


def test_on_cuda_it_is_torch_captured(monkeypatch):
    asked = []
    monkeypatch.setattr(autoselect, "make_denoiser", lambda model, name, *a: asked.append(name))
    autoselect.make(tiny_model(TINY), torch.device("cuda"), torch.float32)
    assert asked == ["torch"] and autoselect.AUTO.graph_capturable


def test_verbose_and_bench_name_the_engine(fakes, tmp_path, capsys, tiny_model_file):
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(tiny_model_file), "--num", "2", "--sampler", "ddim",
                 "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
                 "--verbose", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "for batch 2 in fp32" in err and "ε ms: test-other" in err and out.exists()
    assert main(["sample", "--model", str(tiny_model_file), "--num", "2", "--sampler", "ddim",
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--verbose",
                 "--no-progress", "--backend", "torch"]) == 0
    assert "engine: torch (asked for" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_model_file), "--device", "cpu", "--sampler", "ddim",
                 "--steps", "2", "--batch-size", "2", "--repeats", "1", "--dtype", "fp32"]) == 0
    assert "auto → t" in capsys.readouterr().out  # torch or test-other


@pytest.mark.slow  # builds every installed engine: an ONNX export, an OpenVINO conversion
def test_real_engines_give_torch_images():
    """Whichever installed engine auto picks, and ONNX Runtime itself, draw torch fp32's images."""
    model = tiny_model(TINY)
    want = sample(model, num=3, backend="torch", **DDIM20)
    runner = Sampler(model, **DDIM20)
    got = runner.run(seed=0, first=0, batch=3).float().clamp(-1, 1)
    assert runner.denoise.choices[3]["engine"] in autoselect.installed_engines()
    assert (got - want).abs().max().item() <= 1e-4
    if "onnxruntime" in autoselect.installed_engines():
        ort = sample(model, num=3, backend="onnxruntime", **DDIM20)
        assert (ort - want).abs().max().item() <= 1e-4


def test_verbose_lasts_one_command(tmp_path, tiny_model_file, capsys):
    """--verbose's stderr handler goes when its command ends: a later command in the same process
    (cli.main called again, as the fuzz suite does) logs nothing, and never to a stderr that has
    since been replaced."""
    import logging

    logger = logging.getLogger("fastddpm")
    handlers, level = list(logger.handlers), logger.level
    argv = ["sample", "--model", str(tiny_model_file), "--num", "2", "--sampler", "ddim", "--steps", "2",
            "--device", "cpu", "--backend", "torch", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a.png"), "--verbose"]) == 0
    assert "engine: torch (asked for with --backend)" in capsys.readouterr().err
    assert logger.handlers == handlers and logger.level == level
    assert main([*argv, "--out", str(tmp_path / "b.png")]) == 0
    assert "engine:" not in capsys.readouterr().err
