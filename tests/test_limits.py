"""Counts a user gives are bounded by the memory this machine has (fastddpm.limits): a request
that cannot fit ends in one line and exit 2 before any work, and one that fits runs."""
import subprocess
import sys

import pytest
from tiny import TINY, tiny_model

from fastddpm import limits
from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.runtime import check_request, sample
from fastddpm.unet import named_config


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "memory" in err, err
    return err


@pytest.mark.parametrize("argv, named", [
    (["sample", "--num", "1000000000000"], "drawing 1000000000000 images"),
    (["sample", "--num", "100000000", "--progressive", "10"], "--progressive 10"),
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
    import torch

    from fastddpm.unet import UNet

    cfg = named_config("digits")
    unet = UNet(cfg).eval()
    kept = []
    for level in unet.down:
        for module in [*level.res, *level.attn] + ([level.resample] if level.resample else []):
            module.register_forward_hook(lambda m, i, o: kept.append(o.numel() * o.element_size()))
    with torch.inference_mode():
        unet(torch.randn(2, 1, 16, 16), torch.tensor([3, 700]))
    assert limits.forward_bytes(cfg) > sum(kept) / 2
