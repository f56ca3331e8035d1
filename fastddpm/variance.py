"""A learned variance (Nichol & Dhariwal 2021, improved DDPM): the network outputs 2C channels,
its prediction (ε, x0 or v) and, in the second C, v, which sets σ per element.

What v means is diffusers' DDPMScheduler's (the reference for the Hub's models), for the step
from t to the visited t_prev with β = 1 − ᾱ_t/ᾱ_prev and β̃ = β (1 − ᾱ_prev)/(1 − ᾱ_t):

    learned:        σ² = v                                (diffusers takes √v as is: NaN where v < 0)
    learned_range:  log σ² = f·log β + (1 − f)·log β̃,    f = (v + 1)/2   (β̃ floored at 1e-20)

Both are σ = σ_row · exp(s_row · w) with w = log v (learned) or w = v (learned_range):

    learned:        σ_row = 1,                        s_row = 1/2
    learned_range:  σ_row = exp((log β + log β̃)/4),   s_row = (log β − log β̃)/4

so a sampler table keeps per-row coefficients (σ and `sigma_slope`), the reverse step reads w
beside ε, and its noise is still drawn in registers. Samplers other than DDPM use the prediction
channels only, as diffusers' DPM-Solver does (its DDIM takes no variance channels at all).
"""
from __future__ import annotations

import torch

from .errors import UserError

LEARNED = ("learned", "learned_range")
POSTERIOR_FLOOR = 1e-20  # diffusers clamps β̃ before its log (β̃ = 0 where ᾱ_prev = 1)


def output_channels(in_channels: int, variance: str) -> int:
    """The channels a network with `in_channels` outputs under `variance`."""
    return 2 * in_channels if variance in LEARNED else in_channels


def check_channels(in_channels: int, out_channels: int, variance: str, where: str) -> None:
    """A network whose output does not fit its variance type: one line naming both."""
    if out_channels != output_channels(in_channels, variance):
        need = "2 × in_channels" if variance in LEARNED else "in_channels"
        raise UserError(f"{where}: variance_type {variance!r} needs out_channels = {need} "
                        f"({output_channels(in_channels, variance)}), the network has {out_channels}")


def learned_sigma(variance: str, beta: torch.Tensor, posterior: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_row, s_row), float64 like β and β̃ (each (S,)), for a learned `variance` type."""
    if variance == "learned":
        return torch.ones_like(beta), torch.full_like(beta, 0.5)
    log_max, log_min = beta.log(), posterior.clamp(min=POSTERIOR_FLOOR).log()
    return ((log_max + log_min) / 4).exp(), (log_max - log_min) / 4


def split_output(output: torch.Tensor, channels: int, learned: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, w) of a network's output (B, C or 2C, ...): its first C = `channels`
    channels, and w (as the module docstring defines it) of a `learned` variance kind read from
    the second C; None where no variance is read (`learned` None)."""
    prediction = output[:, :channels] if output.shape[1] != channels else output
    if learned is None:
        return prediction, None
    v = output[:, channels:]
    return prediction, (v.log() if learned == "learned" else v)
