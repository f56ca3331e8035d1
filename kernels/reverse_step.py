"""The reverse-step update shared by every sampler (see fastddpm/samplers.py for the tables).

    x̂0     = c_x · x_t − c_e · ε                  (clipped to [−1, 1] if `clip`)
    x_prev = a · x̂0 + b · x_t + c · ε + d · x̂0_prev + σ · z

All arithmetic in float32 (float64 in the reference when given float64), I/O in the input dtype.
z is drawn from (seed, global sample index, step, element) by `noise.gaussian`.
"""
from __future__ import annotations

import torch

from .noise import STEP_STREAM, gaussian


def reverse_step_reference(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor,
                           z: torch.Tensor | None = None, x0_prev: torch.Tensor | None = None,
                           clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch. x, eps, z, x0_prev: (B, ...); coef: (7,) one table row. Returns (x_prev, x̂0)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c_x, c_e, a, b, c, d, sigma = coef.to(x.device, dtype).unbind()
    xf, ef = x.to(dtype), eps.to(dtype)
    x0 = c_x * xf - c_e * ef
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    out = a * x0 + b * xf + c * ef
    if x0_prev is not None:
        out = out + d * x0_prev.to(dtype)
    if z is not None:
        out = out + sigma * z.to(dtype)
    return out.to(x.dtype), x0.to(x.dtype)


def reverse_step(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, step: torch.Tensor,
                 rng: torch.Tensor, x0_prev: torch.Tensor | None = None,
                 clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step with row `step` of the table and noise drawn from `rng`.

    coef: (S, 7) float32 table; step: int64 (1,) index into it; rng: int64 (2,) = (seed, global
    index of the batch's first sample). Both live on the device so a CUDA graph replays them."""
    i = int(step.item())
    seed, first = (int(v) for v in rng.tolist())
    sample_index = torch.arange(first, first + x.shape[0], device=x.device)
    z = gaussian(seed, sample_index, i, tuple(x.shape[1:]), STEP_STREAM)
    return reverse_step_reference(x, eps, coef[i], z.to(x.device), x0_prev, clip)
