"""SamplingOptions: one set of defaults, every bad value refused in one line, the same flags in
every command; the backend registry; and the import layering the CLI promises."""
import argparse
import subprocess
import sys

import pytest
import torch

from fastddpm import SamplingOptions, UserError
from fastddpm.backends import Backend, backend_names, get_backend, register_backend
from fastddpm.cli import main
from fastddpm.model import DiffusionModel
from fastddpm.options import add_sampling_arguments
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(), groups=4, dropout=0.0)


@pytest.mark.parametrize("bad", [
    dict(sampler="euler"), dict(spacing="random"), dict(backend="jax"), dict(dtype="fp8"),
    dict(steps=0), dict(steps=-2), dict(sampler="ddpm", eta=0.5), dict(sampler="dpm++", eta=0.0),
    dict(sampler="ddim", eta=float("nan")), dict(sampler="ddim", eta=1.5),
    dict(sampler="ddim", eta=-0.1), dict(batch_size=0)])
def test_every_bad_value_is_one_line(bad):
    with pytest.raises(UserError) as caught:
        SamplingOptions(**bad)
    assert "\n" not in str(caught.value)


def test_flags_round_trip_to_the_defaults():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert SamplingOptions.from_args(parser.parse_args([])) == SamplingOptions()
    args = parser.parse_args(["--sampler", "ddim", "--steps", "7", "--eta", "0.25", "--no-clip",
                              "--no-cuda-graph", "--batch-size", "3", "--dtype", "bf16"])
    assert SamplingOptions.from_args(args) == SamplingOptions(
        sampler="ddim", steps=7, eta=0.25, clip=False, cuda_graph=False, batch_size=3, dtype="bf16")


def test_table_part_only_for_a_step_graph():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, execution=False)
    args = parser.parse_args(["--sampler", "dpm++", "--steps", "4"])
    assert not hasattr(args, "device") and not hasattr(args, "backend")
    assert SamplingOptions.from_args(args) == SamplingOptions(sampler="dpm++", steps=4)


def test_ddim_eta_none_is_deterministic_ddim():
    model = DiffusionModel.create(TINY, ScheduleConfig("linear", 50))
    implicit = model.table(sampler="ddim", steps=10)
    explicit = model.table(SamplingOptions(sampler="ddim", steps=10, eta=0.0))
    assert torch.equal(implicit.coef, explicit.coef) and torch.equal(implicit.timesteps, explicit.timesteps)
    noisy = model.table(sampler="ddim", steps=10, eta=1.0)
    assert not torch.equal(noisy.coef, explicit.coef)


def test_options_are_checked_not_coerced():
    with pytest.raises(TypeError, match="SamplingOptions"):
        SamplingOptions.of("ddim")  # a positional sampler name is a caller's bug, not a choice


@pytest.mark.parametrize("argv", [["sample", "--sampler", "ddpm", "--eta", "0.5"],
                                  ["bench", "--sampler", "dpm++", "--eta", "0.1"],
                                  ["eval", "--steps", "0"]])
def test_cli_refuses_in_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_registered_backend_is_the_one_that_runs():
    calls = []

    def make(model, device, dtype):
        unet = model.unet.to(device, dtype)

        def denoise(x, t):
            calls.append(x.shape[0])
            with torch.no_grad():
                return unet(x, t)
        return denoise

    register_backend(Backend("test-counting", make))
    try:
        assert "test-counting" in backend_names() and get_backend("test-counting").make is make
        model = DiffusionModel.create(TINY, ScheduleConfig("linear", 50))
        from fastddpm.runtime import sample

        got = sample(model, num=3, steps=4, sampler="ddim", device="cpu", backend="test-counting")
        want = sample(model, num=3, steps=4, sampler="ddim", device="cpu", backend="torch")
        assert calls == [3] * 4
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        from fastddpm import backends

        backends._registry.pop("test-counting")


def test_export_backends_are_declared_not_imported():
    code = """
import sys
import fastddpm, fastddpm.cli
from fastddpm.backends import backend_names
assert {"onnxruntime", "tensorrt"} <= set(backend_names()), backend_names()
for command in ("sample", "eval", "bench", "convert", "train"):
    fastddpm.cli.build_parser(command)
assert not [m for m in sys.modules if m.startswith("fastddpm.export")], "core imported export"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_help_imports_no_command():
    code = """
import contextlib, io, sys
import fastddpm.cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        fastddpm.cli.main(["--help"])
    except SystemExit:
        pass
assert not [m for m in sys.modules if m.startswith(("fastddpm.commands.", "fastddpm.export"))]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
