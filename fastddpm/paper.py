"""The paper's own uses of the reverse process (Ho et al. 2020, §4.3):

- progressive generation: the predicted x̂0 as sampling goes (Fig. 6);
- reconstruction from x_t: encode x0 to x_t ~ q(x_t | x0), decode with the reverse process —
  large t keeps only coarse features (Figs. 7, 10);
- interpolation: encode two images to x_t, mix the latents linearly, decode with the reverse
  noise held fixed across the mixing weights (Fig. 8).

All run on the same loop (`runtime.Sampler`) and kernels as plain sampling.
"""
from __future__ import annotations

import torch

from . import kernels
from .backends import resolve_device
from .errors import UserError
from .kernels.noise import INIT_STREAM
from .model import DiffusionModel
from .runtime import DTYPES, Sampler, check_request


def _model(model: DiffusionModel | str | None) -> DiffusionModel:
    from .checkpoint import load

    return model if isinstance(model, DiffusionModel) else load(model or "default")


def progressive(model: DiffusionModel | str | None = None, num: int = 8, snapshots: int = 10,
                steps: int | None = None, sampler: str = "ddpm", seed: int = 0,
                device: str | torch.device | None = None, eta: float = 0.0,
                spacing: str = "leading", clip: bool | None = None, backend: str = "torch",
                dtype: str = "fp32", cuda_graph: bool = True) -> torch.Tensor:
    """x̂0 predictions at `snapshots` evenly spaced steps (the last is the sample itself), for
    samples 0 … num−1 of `seed` drawn as `runtime.sample` draws them (same arguments).
    Returns float32 CPU (snapshots, num, C, H, W) in [−1, 1]."""
    check_request(num, seed, dtype)
    model = _model(model)
    table = model.table(sampler, steps, eta, spacing, clip)
    if not 1 <= snapshots <= table.num_steps:
        raise UserError(f"snapshots must be between 1 and {table.num_steps}, got {snapshots}")
    last = table.num_steps - 1
    keep = {round(last * (k + 1) / snapshots) for k in range(snapshots)}
    frames = []
    runner = Sampler(model, table, resolve_device(device), DTYPES[dtype], backend, cuda_graph)
    runner.run(seed, 0, num, on_step=lambda i, x0: frames.append(x0.to("cpu", torch.float32, copy=True))
               if i in keep else None)
    return torch.stack(frames).clamp(-1, 1)


def encode(model: DiffusionModel, x0: torch.Tensor, t: int, seed: int = 0) -> torch.Tensor:
    """x_t ~ q(x_t | x0) = √ᾱ_t x0 + √(1−ᾱ_t) ε (eq. 4), ε from the seed's initial-noise stream."""
    index = torch.arange(x0.shape[0])
    noise = kernels.gaussian(seed, index, 0, tuple(x0.shape[1:]), INIT_STREAM).to(x0.device)
    return model.schedule.q_sample(x0.float(), torch.full((x0.shape[0],), t), noise)


def reconstruct(model: DiffusionModel | str | None, x0: torch.Tensor, t: int,
                steps: int | None = None, sampler: str = "ddpm", seed: int = 0,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Encode `x0` (N, C, H, W) in [−1, 1] to x_t and decode it back. Returns float32 CPU."""
    model = _model(model)
    table = model.table(sampler, steps, start=t)
    t_start = int(table.timesteps[0])  # the visited step at or just below t
    runner = Sampler(model, table, resolve_device(device))
    x_t = encode(model, x0, t_start, seed)
    return runner.run(seed, 0, x0.shape[0], x_start=x_t).float().clamp(-1, 1).cpu()


def interpolate(model: DiffusionModel | str | None, x0_a: torch.Tensor, x0_b: torch.Tensor,
                lambdas: list[float], t: int = 500, steps: int | None = None,
                sampler: str = "ddpm", seed: int = 0,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Decode (1−λ)·x_t(a) + λ·x_t(b) for each λ; a, b: (C, H, W). Returns (len(λ), C, H, W)."""
    model = _model(model)
    if any(not 0.0 <= lam <= 1.0 for lam in lambdas):
        raise UserError("interpolation weights must be in [0, 1]")
    table = model.table(sampler, steps, start=t)
    runner = Sampler(model, table, resolve_device(device))
    x_t = encode(model, torch.stack([x0_a, x0_b]), int(table.timesteps[0]), seed)
    out = []
    for lam in lambdas:  # one run each, all as sample 0 of the seed: the same reverse noise
        mixed = ((1.0 - lam) * x_t[0] + lam * x_t[1])[None]
        out.append(runner.run(seed, 0, 1, x_start=mixed)[0].float().cpu())
    return torch.stack(out).clamp(-1, 1)
