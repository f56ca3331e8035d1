"""SamplingOptions: one set of defaults, every bad value refused in one line, the same flags in
every command; the backend registry; and the import layering the CLI promises."""
import argparse
import subprocess
import sys

import pytest
import torch
from tiny import TINY, tiny_model

from fastddpm import SamplingOptions, UserError, paper
from fastddpm.backends import Backend, backend_names, get_backend, register_backend
from fastddpm.cli import main
from fastddpm.options import add_sampling_arguments
from fastddpm.runtime import Sampler, sample

ETA_NOT_TAKEN = "η is a DDIM option"


@pytest.mark.parametrize("bad,words", [
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(spacing="random"), "unknown timestep spacing 'random'"),
    (dict(backend="jax"), "unknown backend 'jax'"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'"),
    (dict(steps=0), "steps must be positive"),
    (dict(steps=-2), "steps must be positive"),
    (dict(sampler="ddpm", eta=0.5), ETA_NOT_TAKEN),
    (dict(eta=0.0), ETA_NOT_TAKEN),  # the default sampler is DDPM
    (dict(sampler="dpm++", eta=0.0), ETA_NOT_TAKEN),
    (dict(sampler="ddim", eta=float("nan")), "eta must be in [0, 1]"),
    (dict(sampler="ddim", eta=float("inf")), "eta must be in [0, 1]"),
    (dict(sampler="ddim", eta=1.5), "eta must be in [0, 1]"),
    (dict(sampler="ddim", eta=-0.1), "eta must be in [0, 1]"),
    (dict(batch_size=0), "batch size must be positive"),
    (dict(batch_size=-3), "batch size must be positive")])
def test_every_bad_value_is_one_line(bad, words):
    with pytest.raises(UserError) as caught:
        SamplingOptions(**bad)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_copy_is_checked_like_a_new_object():
    with pytest.raises(UserError, match=ETA_NOT_TAKEN):
        SamplingOptions(sampler="ddim", eta=0.5).replace(sampler="ddpm")
    with pytest.raises(TypeError):
        SamplingOptions().replace(temperature=0.7)  # not a field: a caller's bug


def test_eta_for_ddpm_is_refused_wherever_choices_are_given():
    """Was: η silently dropped by DDPM and DPM-Solver++, in every entry point."""
    model = tiny_model()
    x0 = torch.zeros(1, 1, 8, 8)
    calls = [lambda: sample(model, num=1, steps=2, device="cpu", eta=0.5),
             lambda: Sampler(model, sampler="dpm++", steps=2, device="cpu", eta=0.0),
             lambda: model.table(sampler="ddpm", eta=1.0),
             lambda: paper.progressive(model, num=1, snapshots=1, steps=2, device="cpu", eta=0.5),
             lambda: paper.reconstruct(model, x0, 20, steps=2, device="cpu", eta=0.5)]
    for call in calls:
        with pytest.raises(UserError, match=ETA_NOT_TAKEN) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_flags_round_trip_to_the_defaults():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert SamplingOptions.from_args(parser.parse_args([])) == SamplingOptions()
    args = parser.parse_args(["--sampler", "ddim", "--steps", "7", "--eta", "0.25", "--no-clip",
                              "--no-cuda-graph", "--batch-size", "3", "--dtype", "bf16"])
    assert SamplingOptions.from_args(args) == SamplingOptions(
        sampler="ddim", steps=7, eta=0.25, clip=False, cuda_graph=False, batch_size=3, dtype="bf16")
    # each flag alone moves its own field only
    assert SamplingOptions.from_args(parser.parse_args(["--no-cuda-graph"])) == \
        SamplingOptions(cuda_graph=False)
    assert SamplingOptions.from_args(parser.parse_args(["--clip"])) == SamplingOptions(clip=True)
    assert SamplingOptions.from_args(parser.parse_args(["--device", "cpu", "--backend", "compile",
                                                        "--spacing", "trailing"])) == \
        SamplingOptions(device="cpu", backend="compile", spacing="trailing")


def test_table_part_only_for_a_step_graph():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, execution=False)
    args = parser.parse_args(["--sampler", "dpm++", "--steps", "4"])
    assert not hasattr(args, "device") and not hasattr(args, "backend")
    assert SamplingOptions.from_args(args) == SamplingOptions(sampler="dpm++", steps=4)


def test_ddim_eta_none_is_deterministic_ddim():
    model = tiny_model(TINY)
    implicit = model.table(SamplingOptions(sampler="ddim", steps=10))
    assert implicit.name == "ddim" and SamplingOptions(sampler="ddim").eta is None
    explicit = model.table(SamplingOptions(sampler="ddim", steps=10, eta=0.0))
    assert torch.equal(implicit.coef, explicit.coef) and torch.equal(implicit.timesteps, explicit.timesteps)
    assert torch.equal(model.table(sampler="ddim", steps=10).coef, explicit.coef)  # as keywords
    assert (explicit.coef[:, -1] == 0).all()  # σ = 0 at every step: deterministic
    noisy = model.table(sampler="ddim", steps=10, eta=1.0)
    assert not torch.equal(noisy.coef, explicit.coef)


def test_options_are_checked_not_coerced():
    with pytest.raises(TypeError, match="SamplingOptions"):
        SamplingOptions.of("ddim")  # a positional sampler name is a caller's bug, not a choice


@pytest.mark.parametrize("argv,words", [
    (["sample", "--sampler", "ddpm", "--eta", "0.5"], ETA_NOT_TAKEN),
    (["sample", "--eta", "0.5"], ETA_NOT_TAKEN),  # DDPM by default
    (["sample", "--sampler", "ddim", "--eta", "nan"], "eta must be in [0, 1]"),
    (["bench", "--sampler", "dpm++", "--eta", "0.1"], ETA_NOT_TAKEN),
    (["eval", "--sampler", "ddpm", "--eta", "0.5"], ETA_NOT_TAKEN),
    (["export", "default", "--what", "step", "--sampler", "ddpm", "--eta", "0.5"], ETA_NOT_TAKEN),
    (["eval", "--steps", "0"], "steps must be positive"),
    (["sample", "--batch-size", "0"], "batch size must be positive")])
def test_cli_refuses_in_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm {argv[0]}: error: ") and words in err, err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_registered_backend_is_the_one_that_runs():
    calls = []

    def make(model, device, dtype, threads):
        unet = model.unet.to(device, dtype)

        def denoise(x, t):
            calls.append(x.shape[0])
            with torch.no_grad():
                return unet(x, t)
        return denoise

    register_backend(Backend("test-counting", make))
    try:
        assert "test-counting" in backend_names() and get_backend("test-counting").make is make
        model = tiny_model(TINY)
        got = sample(model, num=3, steps=4, sampler="ddim", device="cpu", backend="test-counting")
        want = sample(model, num=3, steps=4, sampler="ddim", device="cpu", backend="torch")
        assert calls == [3] * 4
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        from fastddpm import backends

        backends._registry.pop("test-counting")


def test_export_backends_are_declared_not_imported():
    """Every command but export, and the library modules they use, run without fastddpm.export:
    its backends are entry points, loaded only when named."""
    code = """
import sys
import fastddpm, fastddpm.cli
from fastddpm.backends import backend_names
assert {"onnxruntime", "tensorrt"} <= set(backend_names()), backend_names()
for command in ("sample", "eval", "bench", "convert", "train"):
    fastddpm.cli.build_parser(command).parse_args([command] + (["x"] if command == "convert" else []))
import fastddpm.commands.sample, fastddpm.commands.eval, fastddpm.commands.bench
import fastddpm.commands.convert, fastddpm.commands.train
import fastddpm.runtime, fastddpm.paper, fastddpm.timing, fastddpm.judge, fastddpm.likelihood
import fastddpm.train, fastddpm.checkpoint, fastddpm.interop
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
