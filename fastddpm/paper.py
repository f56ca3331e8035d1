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
from .errors import UserError
from .kernels.noise import INIT_STREAM
from .model import DiffusionModel
from .options import SamplingOptions
from .runtime import Sampler, check_request


def _checked_model(model: DiffusionModel | str | None, num: int, seed: int, kept: int, batch: int,
                   what: str) -> DiffusionModel:
    """The model, loaded if need be, once the request is known to fit in memory: `kept` images
    held until returned and one batch of `batch` (runtime.check_request), before the Sampler
    (its engine) is built."""
    from .checkpoint import load

    check_request(num, seed)
    model = model if isinstance(model, DiffusionModel) else load(model or "default")
    check_request(num, seed, model, kept=kept, batch=batch, what=what)
    return model


def progressive(model: DiffusionModel | str | None = None, num: int = 8, snapshots: int = 10,
                seed: int = 0, options: SamplingOptions | None = None, **choices) -> torch.Tensor:
    """x̂0 predictions at `snapshots` evenly spaced steps (the last is the sample itself), for
    samples 0 … num−1 of `seed` drawn as `runtime.sample` draws them (same options).
    Returns float32 CPU (snapshots, num, C, H, W) in [−1, 1]."""
    # its num images in one batch, every snapshot of each kept until returned
    model = _checked_model(model, num, seed, num * snapshots, num,
                           f"{num} images × {snapshots} progressive snapshots")
    runner = Sampler(model, options, **choices)
    last = runner.table.num_steps - 1
    if not 1 <= snapshots <= last + 1:
        raise UserError(f"snapshots must be between 1 and {last + 1}, got {snapshots}")
    keep = {round(last * (k + 1) / snapshots) for k in range(snapshots)}
    frames = []
    runner.run(seed, 0, num, on_step=lambda i, x0: frames.append(x0.to("cpu", torch.float32, copy=True))
               if i in keep else None)
    return torch.stack(frames).clamp(-1, 1)


def encode(model: DiffusionModel, x0: torch.Tensor, t: int, seed: int = 0) -> torch.Tensor:
    """x_t ~ q(x_t | x0) = √ᾱ_t x0 + √(1−ᾱ_t) ε (eq. 4), image i's ε from sample i of the seed's
    initial-noise stream."""
    index = torch.arange(x0.shape[0])
    noise = kernels.gaussian(seed, index, 0, tuple(x0.shape[1:]), INIT_STREAM).to(x0.device)
    return model.schedule.q_sample(x0.float(), torch.full((x0.shape[0],), t), noise)


def _start(runner: Sampler) -> int:
    return int(runner.table.timesteps[0])  # the visited timestep at or just below the asked t


def reconstruct(model: DiffusionModel | str | None, x0: torch.Tensor, t: int, seed: int = 0,
                options: SamplingOptions | None = None, **choices) -> torch.Tensor:
    """Encode `x0` (N, C, H, W) in [−1, 1] to x_t and decode it back with the reverse process
    (options: those of `runtime.sample`). Returns float32 CPU (N, C, H, W)."""
    model = _checked_model(model, len(x0), seed, len(x0), len(x0),
                           f"reconstructing {len(x0)} images in one batch")
    runner = Sampler(model, options, t, **choices)
    x_t = encode(model, x0, _start(runner), seed)
    return runner.run(seed, 0, x0.shape[0], x_start=x_t).float().clamp(-1, 1).cpu()


def interpolate(model: DiffusionModel | str | None, x0_a: torch.Tensor, x0_b: torch.Tensor,
                lambdas: list[float], t: int = 500, seed: int = 0,
                options: SamplingOptions | None = None, **choices) -> torch.Tensor:
    """Decode (1−λ)·x_t(a) + λ·x_t(b) for each λ. a, b: (C, H, W), or (P, C, H, W) for P pairs
    interpolated at once. Pair p is sample p of the seed at every λ, so its reverse noise is the
    same along its row, as the paper holds it. Returns float32 CPU (len(λ), [P,] C, H, W)."""
    if any(not 0.0 <= lam <= 1.0 for lam in lambdas):
        raise UserError("interpolation weights must be in [0, 1]")
    single = x0_a.ndim == 3
    a, b = (x0_a[None], x0_b[None]) if single else (x0_a, x0_b)
    if a.shape != b.shape:
        raise UserError(f"the images to interpolate differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    pairs = len(a)
    # the pairs in one batch per weight, their latents and every mix kept until returned
    model = _checked_model(model, pairs, seed, pairs * (len(lambdas) + 2), pairs,
                           f"interpolating {pairs} pair(s) at {len(lambdas)} weights")
    runner = Sampler(model, options, t, **choices)
    # a_p and b_p take the encoding noise of samples 2p and 2p+1: a pair's latents differ in noise
    x_t = encode(model, torch.stack([a, b], 1).flatten(0, 1), _start(runner), seed)
    x_t = x_t.unflatten(0, (pairs, 2))
    out = torch.stack([runner.run(seed, 0, pairs, x_start=(1.0 - lam) * x_t[:, 0] + lam * x_t[:, 1])
                       .float().cpu() for lam in lambdas]).clamp(-1, 1)
    return out[:, 0] if single else out
