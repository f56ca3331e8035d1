"""Tuned time grids: the N timesteps at which a few-step sampler best follows a fine trajectory.

From the same x_T (`calib` draws of one seed), a reference runs DDIM over REFERENCE_STEPS trailing
steps (the probability-flow ODE that every deterministic sampler here discretises, with the
model's clipping). Then, in two stages:

1. Dynamic programming over the reference's own timesteps, as GITS does (Chen et al. 2024,
   "On the trajectory regularity of ODE-based diffusion sampling"): the cost of an edge i → j is
   the RMS distance between one DDIM step from the reference's state at t_i to t_j and the
   reference's state at t_j (no new ε evaluation: the reference computed ε at t_i); the grid is
   the path of exactly N edges from t = T−1 to the end (ᾱ = 1) of least total cost, a bound on
   the global error by the triangle inequality.
2. A local search with the sampler itself (it may take history, so its error is not a sum of
   one-step errors): from the best of that grid, `trailing` and `logsnr`, each inner timestep
   moves a fraction of the gap to a neighbour (1/4, then 1/8, then 1/16) where that lowers the
   mean squared distance of the sampler's x_0 to the reference's, in one sweep per fraction.

T−1 stays the first timestep (x_T is drawn as N(0, I), which is x at T−1 to within √ᾱ_{T−1}).
Deterministic for a seed: fixed draws, a fixed order of moves, only strict improvements kept.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UserError
from .kernels import reverse_step_reference
from .limits import check_fits, request_bytes
from .model import DiffusionModel, Grid
from .options import MAX_BATCH, SamplingOptions
from .runtime import Sampler
from .samplers import COEF_FIELDS, SAMPLERS, ddim_table, timestep_sequence

REFERENCE_STEPS = 100
FRACTIONS = (1 / 4, 1 / 8, 1 / 16)
MAX_SWEEPS = 1  # per fraction: sweeps over the inner timesteps


@dataclass(frozen=True)
class TunedGrid:
    timesteps: Grid  # descending
    error: float  # mean squared distance of the sampler's x_0 to the reference's, per element
    start_errors: dict[str, float]  # the same for the grids the search started from
    evaluations: int  # few-step runs of the sampler during the search


@dataclass
class _Reference:
    timesteps: list[int]  # the R visited, descending (T−1 first)
    states: torch.Tensor  # float64 (R + 1, N, D): x before each step, then the final x_0
    x0: torch.Tensor  # float64 (R, N, D): the (clipped) x̂0 of each step
    clip: bool


def check_request(model: DiffusionModel, sampler: str, steps: int, calib: int) -> None:
    """One-line errors, before any work: an unknown or stochastic sampler, steps outside 1..T,
    more calibration draws than this machine can hold the reference of (fastddpm.limits)."""
    if not isinstance(calib, int) or calib <= 0:
        raise UserError(f"calib must be positive, got {calib}")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    T = model.schedule.num_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise UserError(f"steps must be between 1 and {T} (the model's T), got {steps}")
    # the reference keeps x and x̂0 of every draw at each of its steps in float64, beside the
    # calibration draws the runs return and one batch's forward
    cfg = model.config
    kept = 8 * (2 * _reference_steps(T, steps) + 1) * calib * cfg.out_channels * cfg.image_size ** 2
    need = kept + request_bytes(cfg, calib, min(calib, MAX_BATCH))
    check_fits(f"tuning on {calib} calibration draws", need, "use fewer calibration draws (--calib)")
    if not _deterministic(model, sampler):
        choices = ", ".join(s for s in SAMPLERS if _deterministic(model, s))
        raise UserError(f"the {sampler} sampler draws fresh noise at every step, so no grid makes it "
                        f"follow one path; tune a deterministic sampler ({choices})")


def _reference_steps(T: int, steps: int) -> int:
    """The reference's DDIM steps: REFERENCE_STEPS, at least twice the grid's, at most T."""
    return min(T, max(REFERENCE_STEPS, 2 * steps))


def _deterministic(model: DiffusionModel, sampler: str) -> bool:
    table = model.table(SamplingOptions(sampler=sampler, steps=min(2, model.schedule.num_timesteps),
                                        spacing="trailing"))
    return bool((table.coef[:, COEF_FIELDS.index("sigma")] == 0).all())


def tune_grid(model: DiffusionModel, sampler: str, steps: int, calib: int = 256, seed: int = 0,
              options: SamplingOptions | None = None,
              report: Callable[[str], None] = lambda line: None) -> TunedGrid:
    """The grid of `steps` timesteps for `sampler` on `model` (see the module docstring).
    `options` gives the device, backend and batch size of the runs; `report` hears progress."""
    check_request(model, sampler, steps, calib)
    options = SamplingOptions.of(options, sampler=sampler, steps=steps, spacing="tuned")
    T = model.schedule.num_timesteps
    ref = _reference(model, options, _reference_steps(T, steps), calib, seed)
    report(f"reference: DDIM over {len(ref.timesteps)} steps from {calib} draws of seed {seed}")
    target = ref.states[-1]

    evaluations = 0
    cache: dict[Grid, float] = {}

    def error(grid: Grid) -> float:
        nonlocal evaluations
        if grid not in cache:
            evaluations += 1
            x0 = _run(model, options, grid, calib, seed)
            cache[grid] = float(((x0 - target) ** 2).mean())
        return cache[grid]

    starts = {"dp": _dynamic_programming(model, ref, steps, options)}
    for spacing in ("trailing", "logsnr"):
        starts[spacing] = tuple(timestep_sequence(model.schedule, steps, spacing))
    start_errors = {name: error(grid) for name, grid in starts.items()}
    report("start: " + ", ".join(f"{name} {e:.3g}" for name, e in start_errors.items()))
    best = min(starts.values(), key=lambda g: (error(g), g))
    for fraction in FRACTIONS:
        for _ in range(MAX_SWEEPS):
            moved = False
            for k in range(1, steps):
                for candidate in _moves(best, k, fraction):
                    if error(candidate) < error(best):
                        best, moved = candidate, True
            if not moved:
                break
        report(f"moves of 1/{round(1 / fraction)} the gap: {best}, error {error(best):.3g}")
    return TunedGrid(best, error(best), start_errors, evaluations)


def _moves(grid: Grid, k: int, fraction: float) -> list[Grid]:
    """Grid with timestep k moved `fraction` of the way to the neighbour above, then below (the
    end, ᾱ = 1, sits below the last at t = −1); a move that rounds to no change is dropped."""
    above, below = grid[k - 1], grid[k + 1] if k + 1 < len(grid) else -1
    out = []
    for new in (grid[k] + round(fraction * (above - grid[k])), grid[k] - round(fraction * (grid[k] - below))):
        if below < new < above and new != grid[k]:
            out.append(grid[:k] + (new,) + grid[k + 1:])
    return out


def _run(model: DiffusionModel, options: SamplingOptions, grid: Grid, calib: int,
         seed: int) -> torch.Tensor:
    """x_0 of the sampler over `grid`, float64 (calib, D), through the runtime's own loop."""
    trial = DiffusionModel(model.unet, model.schedule,
                           model.sampling.with_grid(options.sampler, len(grid), grid))
    runner = Sampler(trial, options)
    out = [runner.run(seed, first, n) for first, n in options.batches(calib)]
    return torch.cat(out).double().flatten(1)


@torch.inference_mode()
def _reference(model: DiffusionModel, options: SamplingOptions, steps: int, calib: int,
               seed: int) -> _Reference:
    """DDIM over `steps` trailing steps, keeping x and x̂0 at every step."""
    runner = Sampler(model, options.replace(sampler="ddim", steps=steps, spacing="trailing"))
    table = runner.table
    states, x0s = [], []
    for first, n in options.batches(calib):
        x = runner.initial_noise(seed, first, n).float()
        xs, hats = [], []
        for i, t in enumerate(table.timesteps.tolist()):
            xs.append(x.double().flatten(1).cpu())
            eps, _ = runner.predict(x.to(runner.dtype), torch.full((n,), t, device=runner.device))
            x, x0 = reverse_step_reference(x, eps.float(), table.coef[i], clip=table.clip)
            hats.append(x0.double().flatten(1).cpu() * table.x0_scale)  # x̂0, not x̂0/r
        xs.append(x.double().flatten(1).cpu())
        states.append(torch.stack(xs))
        x0s.append(torch.stack(hats))
    return _Reference(table.timesteps.tolist(), torch.cat(states, 1), torch.cat(x0s, 1), table.clip)


def _dynamic_programming(model: DiffusionModel, ref: _Reference, steps: int,
                         options: SamplingOptions) -> Grid:
    """The path of `steps` DDIM steps over the reference's timesteps of least summed RMS error."""
    R = len(ref.timesteps)
    # one DDIM step i → j: a_ij x̂0_i + b_ij x_i, the first row of DDIM's table over (t_i, t_j)
    a = torch.zeros(R, R + 1, dtype=torch.float64)
    b = torch.zeros(R, R + 1, dtype=torch.float64)
    ia, ib = COEF_FIELDS.index("a"), COEF_FIELDS.index("b")
    for i, t in enumerate(ref.timesteps):
        for j in range(i + 1, R + 1):
            grid = (t, ref.timesteps[j]) if j < R else (t,)
            row = ddim_table(model.schedule, len(grid), grid, clip=ref.clip).coef[0]
            a[i, j], b[i, j] = row[ia], row[ib]
    # mean over draws and elements of (a P_i + b X_i − X_j)², expanded into inner products
    P, X = ref.x0.flatten(1), ref.states.flatten(1)
    size = P.shape[1]
    pp = (P * P).sum(1) / size
    xx = (X * X).sum(1) / size
    px = P @ X.T / size  # (R, R + 1)
    xx_ij = X[:R] @ X.T / size
    idx = torch.arange(R)
    mse = (a**2 * pp[:, None] + b**2 * xx[:R, None] + xx[None, :] + 2 * a * b * px[idx, idx][:, None]
           - 2 * a * px - 2 * b * xx_ij)
    cost = mse.clamp(min=0.0).sqrt()
    cost[~torch.ones(R, R + 1, dtype=torch.bool).triu(1)] = float("inf")
    # best[k, j]: least cost of k edges from node 0 to node j; node R is the end (ᾱ = 1)
    best = torch.full((steps + 1, R + 1), float("inf"), dtype=torch.float64)
    came = torch.zeros(steps + 1, R + 1, dtype=torch.int64)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:R, None] + cost  # (from i, to j)
        best[k], came[k] = total.min(0)
    path, node = [], R
    for k in range(steps, 0, -1):
        node = int(came[k, node])
        path.append(ref.timesteps[node])
    return tuple(path[::-1])
