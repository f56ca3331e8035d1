"""Counts a user gives are bounded by the memory this machine has (fastddpm.limits): a request
that cannot fit ends in one line and exit 2 before any work, and one that fits runs."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import TINY, TINY_ATTN, tiny_model

from fastddpm import limits, paper, shards
from fastddpm.cli import main
from fastddpm.distributed import Distributed
from fastddpm.errors import UserError
from fastddpm.options import SamplingOptions
from fastddpm.runtime import Sampler, check_request, sample
from fastddpm.train import TrainConfig, Trainer
from fastddpm.unet import UNet, named_config


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "memory" in err, err
    return err


@pytest.mark.parametrize("argv, named", [
    (["sample", "--num", "1000000000000"], "drawing 1000000000000 images"),
    (["sample", "--num", "100000000", "--progressive", "10", "--steps", "10"],
     "100000000 images × 10 progressive snapshots"),
    (["sample", "--from", "digits", "--interpolate", "1000000000000"], "--interpolate 1000000000000"),
    (["export", "default", "--batch", "100000000"], "--batch 100000000"),
])
def test_requests_past_the_machine_are_refused_before_any_work(tmp_path, capsys, argv, named):
    out = tmp_path / ("x.onnx" if argv[0] == "export" else "x.png")
    err = _refused(capsys, [*argv, "--out" if argv[0] == "sample" else "-o", str(out)])
    assert named in err
    assert list(tmp_path.iterdir()) == []


def test_the_bound_is_the_estimate_against_available_memory(monkeypatch):
    cfg = named_config("digits")
    need = limits.request_bytes(cfg, kept=1000, batch=100)
    assert need > limits.request_bytes(cfg, kept=999, batch=100) > limits.request_bytes(cfg, 999, 99)
    monkeypatch.setattr(limits, "available_memory", lambda: need)
    limits.check_request_fits(cfg, 1000, 100, "this")  # exactly what there is: fits
    with pytest.raises(UserError, match="this would take"):
        limits.check_request_fits(cfg, 1001, 100, "this")


def test_sample_refuses_in_process_and_draws_what_fits(monkeypatch):
    model = tiny_model(TINY)
    need = limits.request_bytes(TINY, kept=3, batch=3)
    monkeypatch.setattr(limits, "available_memory", lambda: need)
    assert sample(model, num=3, steps=2, sampler="ddim").shape == (3, 1, 8, 8)
    with pytest.raises(UserError, match="drawing 4 images"):
        sample(model, num=4, steps=2, sampler="ddim")
    with pytest.raises(UserError, match="drawing 4 images"):
        check_request(4, 0, model)


def test_a_limit_the_process_runs_under_is_the_bound():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY));"
            "from fastddpm.limits import available_memory; print(available_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == 3 << 30


def test_the_estimate_covers_the_tensors_a_forward_keeps():
    """forward_bytes counts every skip tensor the U-Net keeps for its up path: at least the sum
    of the down path's outputs, which a forward hook sees (a lower bound on the real peak)."""
    cfg = named_config("digits")
    unet = UNet(cfg).eval()
    kept = []
    for level in unet.down:
        for module in [*level.res, *level.attn] + ([level.resample] if level.resample else []):
            module.register_forward_hook(lambda m, i, o: kept.append(o.numel() * o.element_size()))
    with torch.inference_mode():
        unet(torch.randn(2, 1, 16, 16), torch.tensor([3, 700]))
    assert limits.forward_bytes(cfg) > sum(kept) / 2


SMALL_MACHINE = 8 << 30  # what these tests assume, so a machine with more memory refuses alike


@pytest.mark.parametrize("argv, named", [
    (["bench", "--batch-size", "1000000000", "--backends", "torch"], "a batch of 1000000000 images"),
    (["train", "--batch-size", "100000", "--device", "cpu", "--out", "{tmp}/run"],
     "a training step at --batch-size 100000"),
    (["eval", "--bpd", "--batch-size", "1000000", "--device", "cpu"],
     "the bound of 300 images in batches of 300000 (image, t) pairs"),
    (["tune-steps", "default", "--steps", "4", "--calib", "1000000", "--out", "{tmp}/tuned.pt"],
     "tuning on 1000000 calibration draws"),
    (["eval", "--isc", "--num", "1000000000", "--device", "cpu"],
     "the Inception Score of 1000000000 samples"),
])
def test_batches_past_the_machine_are_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, named):
    """Each command's batch (and what it keeps beside it) is bounded like sample's --num: one
    line naming the request, exit 2, nothing written."""
    monkeypatch.setattr(limits, "available_memory", lambda: SMALL_MACHINE)
    monkeypatch.chdir(tmp_path)
    err = _refused(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert named in err and "8.6 GB this machine has" in err
    assert list(tmp_path.iterdir()) == []


def test_a_training_batch_is_bounded_by_its_activations(tmp_path, monkeypatch):
    """The bound is the batch times train_bytes: the batch that fits builds its run, one more
    image is refused before the run folder exists."""
    cfg = named_config("digits")
    monkeypatch.setattr(limits, "available_memory", lambda: 4 * limits.train_bytes(cfg))
    with pytest.raises(UserError, match="a training step at --batch-size 5 .*; lower --batch-size"):
        Trainer(TrainConfig(out=str(tmp_path / "five"), batch_size=5, device="cpu"))
    assert not (tmp_path / "five").exists()
    Trainer(TrainConfig(out=str(tmp_path / "four"), batch_size=4, device="cpu"))


# both of its resamplers ResBlocks (diffusers' "resnet" resampling)
RESNET_RESAMPLING = replace(TINY_ATTN, resnet_down_resolutions=(8,), resnet_up_resolutions=(4,))


@pytest.mark.parametrize("cfg", [named_config("digits"), TINY_ATTN, RESNET_RESAMPLING],
                         ids=["digits", "attention", "resnet-resampling"])
def test_the_training_estimate_covers_what_autograd_keeps(cfg):
    """train_bytes is at least what a training forward saves for its backward (saved-tensor
    hooks see each tensor; the weights are not per image), a lower bound on the step's peak."""
    unet = UNet(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size), torch.tensor([3, 40]))
    assert batch * limits.train_bytes(cfg) > sum(saved.values())


def test_a_sampler_refuses_a_batch_past_the_machine():
    """Sampler.run bounds every batch it draws (bench's, a shard's, a direct caller's)."""
    runner = Sampler(tiny_model(TINY), steps=2, sampler="ddim", backend="torch")
    with pytest.raises(UserError, match="a batch of 1000000000000 images would take .*; lower the batch"):
        runner.run(0, 0, 10**12)


def _fits_exactly(monkeypatch, kept: int, batch: int) -> None:
    monkeypatch.setattr(limits, "available_memory", lambda: limits.request_bytes(TINY, kept, batch))


def test_the_papers_uses_are_bounded_like_the_command_line(monkeypatch):
    """paper.progressive, reconstruct and interpolate check what they keep and their batch
    before sampling: what fits runs, one more snapshot, image or weight is refused."""
    model, choices = tiny_model(TINY), dict(steps=3, sampler="ddim", backend="torch")
    _fits_exactly(monkeypatch, kept=2 * 2, batch=2)
    assert paper.progressive(model, num=2, snapshots=2, **choices).shape == (2, 2, 1, 8, 8)
    with pytest.raises(UserError, match="2 images × 3 progressive snapshots would take"):
        paper.progressive(model, num=2, snapshots=3, **choices)

    images = torch.zeros(4, 1, 8, 8)
    _fits_exactly(monkeypatch, kept=3, batch=3)
    assert paper.reconstruct(model, images[:3], 20, **choices).shape == (3, 1, 8, 8)
    with pytest.raises(UserError, match="reconstructing 4 images in one batch would take"):
        paper.reconstruct(model, images, 20, **choices)

    _fits_exactly(monkeypatch, kept=1 * (2 + 2), batch=1)  # a pair, its two latents, two mixes
    assert paper.interpolate(model, images[0], images[1], [0.0, 1.0], 20, **choices).shape == (2, 1, 8, 8)
    with pytest.raises(UserError, match=r"interpolating 1 pair\(s\) at 3 weights would take"):
        paper.interpolate(model, images[0], images[1], [0.0, 0.5, 1.0], 20, **choices)


def test_a_sharded_job_is_bounded_by_the_join_of_its_images(tmp_path, monkeypatch):
    """Rank 0 joins every shard in memory to write the output: a job whose join cannot fit is
    refused before any rank draws (it used to draw for ever, then fail); one that fits runs."""
    have = limits.request_bytes(TINY, 3, 3)  # a batch of 3 fits where it is drawn
    monkeypatch.setattr(limits, "available_memory", lambda: have)
    options = SamplingOptions(sampler="ddim", steps=2, batch_size=3, device="cpu", backend="torch")
    too_many, model = have // shards.join_bytes(1, 1, 8) + 1, tiny_model(TINY)
    with pytest.raises(UserError, match=f"joining {too_many} images would take"):
        shards.sample_to(tmp_path / "x.npz", model, too_many, 0, options, Distributed(), progress=False)
    assert list(tmp_path.iterdir()) == []
    shards.sample_to(tmp_path / "x.npz", model, 5, 0, options, Distributed(), progress=False)
    assert np.load(tmp_path / "x.npz")["images"].shape == (5, 8, 8, 1)
