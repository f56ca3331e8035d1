"""The tiny models the tests share: 8×8 U-Nets with two levels, one ResBlock each, 4 groups —
small enough that a whole chain samples in milliseconds on a CPU.

Each test module takes the variant that exercises what it checks (channels, attention, width)
instead of writing a config out again:

    TINY        1 channel, no attention: the cheapest model that samples
    TINY_ATTN   1 channel, self-attention at 4²
    TINY_RGB    3 channels, no attention (colour PNGs and arrays)
    TINY_WIDE   3 channels, attention at 4², 16 wide (exported graphs and ε engines)

`tiny_config(...)` gives any other mix (test_runtime's 2 channels)."""
from __future__ import annotations

from pathlib import Path

import torch

from fastddpm import checkpoint
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import UNetConfig


def tiny_config(channels: int = 1, *, attention: bool = False, width: int = 8,
                dropout: float = 0.0) -> UNetConfig:
    return UNetConfig(image_size=8, in_channels=channels, out_channels=channels,
                      base_channels=width, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,) if attention else (), groups=4, dropout=dropout)


TINY = tiny_config()
TINY_ATTN = tiny_config(attention=True)
TINY_RGB = tiny_config(3)
TINY_WIDE = tiny_config(3, attention=True, width=16)


def tiny_model(config: UNetConfig = TINY, schedule: ScheduleConfig = ScheduleConfig("linear", 50),
               sampling: SamplingDefaults = SamplingDefaults(), seed: int = 0) -> DiffusionModel:
    """A freshly initialised model, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return DiffusionModel.create(config, schedule, sampling)


def perturbed_engine_model(seed: int = 0) -> DiffusionModel:
    """TINY_WIDE with every weight perturbed (norms around 1), in eval mode: not a
    near-identity net, so a slip in an engine's conversion shows, and activations of a real
    spread (what int8 calibration must cover). The ε engines' tests share it."""
    model = tiny_model(TINY_WIDE, ScheduleConfig("linear", 50))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.2))
    model.unet.eval()
    return model


def save_tiny(path: Path, config: UNetConfig = TINY,
              schedule: ScheduleConfig = ScheduleConfig("linear", 50), seed: int = 0) -> Path:
    """`tiny_model(config, schedule, seed=seed)` written to `path` (a model file)."""
    checkpoint.save(tiny_model(config, schedule, seed=seed), path)
    return path
