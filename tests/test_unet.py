"""The ε-model: the paper's parameter counts and a well-formed forward."""
from dataclasses import replace

import pytest
import torch
from tiny import TINY_WIDE

from fastddpm.errors import UserError
from fastddpm.unet import CONFIGS, UNet, UNetConfig, named_config, timestep_embedding


@pytest.mark.parametrize("name,count", [("cifar10", 35_746_307), ("ddpm-256", 113_673_219)])
def test_parameter_counts_match_the_paper(name, count):
    with torch.device("meta"):  # count without allocating 450 MB
        unet = UNet(CONFIGS[name])
    assert sum(p.numel() for p in unet.parameters()) == count


def test_forward_shape_and_timestep_dependence():
    torch.manual_seed(0)
    unet = UNet(TINY_WIDE).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a = unet(x, torch.tensor([0, 10, 999]))
        b = unet(x, torch.tensor([5, 10, 999]))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])  # per-sample t, no leakage


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 37.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-k / 3) for k in range(4)])
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)


def test_config_round_trip_and_validation():
    cfg = CONFIGS["cifar10"]
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="divisible by groups"):
        UNetConfig.from_dict({**cfg.to_dict(), "base_channels": 100})
    resnet = replace(cfg, resnet_down_resolutions=(32, 8), resnet_up_resolutions=(4,))
    assert UNetConfig.from_dict(resnet.to_dict()) == resnet
    # the full-resolution level upsamples nothing, the deepest downsamples nothing
    for field, value in (("resnet_up_resolutions", [32]), ("resnet_down_resolutions", [4])):
        with pytest.raises(UserError, match=f"{field} .* must name levels that resample"):
            UNetConfig.from_dict({**cfg.to_dict(), field: value})
    with pytest.raises(UserError, match="unknown U-Net config field"):
        UNetConfig.from_dict({**cfg.to_dict(), "heads": 4})
    with pytest.raises(UserError, match="unknown model config"):
        named_config("cifar100")
