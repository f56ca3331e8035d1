"""What the learned-variance tests share: a tiny model whose network outputs 2C channels, and the
sampling loop written out by hand against the reverse-step reference."""
from __future__ import annotations

import dataclasses

import torch
from tiny import tiny_config, tiny_model

from fastddpm.kernels import reverse_step_reference
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.samplers import SamplerTable
from fastddpm.schedule import ScheduleConfig


def learned_model(variance: str, prediction: str = "epsilon", channels: int = 2,
                  attention: bool = True) -> DiffusionModel:
    """tests/tiny.py's model with 2 × `channels` outputs (positive variance channels under
    "learned")."""
    config = dataclasses.replace(tiny_config(channels, attention=attention, width=16 if channels == 3 else 8),
                                 out_channels=2 * channels)
    model = tiny_model(config, ScheduleConfig("linear", 50),
                       SamplingDefaults(variance, clip=True, prediction=prediction), seed=3)
    if variance == "learned":
        positive_variance(model.unet.conv_out, channels)
    return model


def positive_variance(conv_out: torch.nn.Conv2d, channels: int) -> None:
    """Makes the variance channels (after the first `channels`) of a network's last conv small
    and positive: under "learned" diffusers takes their square root (NaN where negative)."""
    with torch.no_grad():
        conv_out.weight[channels:] *= 0.01
        conv_out.bias[channels:] = 0.05


def reference_loop(model: DiffusionModel, table: SamplerTable, noise: torch.Tensor,
                   read_w: bool = True) -> torch.Tensor:
    """x_0 from x_T = noise[0] with step noise noise[1:] (the step-graph convention), float32:
    the network's halves split by hand, w = log v ("learned") or v fed to the reference step
    where `read_w`, the x̂0 history newest first."""
    x, channels = noise[0], noise.shape[2]
    history = []
    with torch.no_grad():
        for i, t in enumerate(table.timesteps.tolist()):
            out = model.unet(x, torch.full((x.shape[0],), t))
            v = out[:, channels:]
            w = v.log() if model.sampling.variance == "learned" else v
            x, x0 = reverse_step_reference(x, out[:, :channels], table.coef[i].float(), noise[i + 1],
                                           history, table.clip, w if read_w else None)
            history = [x0, *history][:table.history]
    return x
