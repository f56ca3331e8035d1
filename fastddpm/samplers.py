"""Samplers as tables: every sampler is one linear update per step, built here in float64.

For step i (sampling order, i = 0 is the noisiest) at model timestep t_i, stepping to t_{i+1}
(−1 after the last step, where ᾱ = 1; DDIM's may end at ᾱ_0 instead, `ddim_table`):

    x̂0     = c_x · x_t − c_e · ε            (clipped to [−1, 1] when the table says so)
    x_prev = a · x̂0 + b · x_t + c · ε + d1 · x̂0_{i−1} + d2 · x̂0_{i−2} + d3 · x̂0_{i−3} + σ · z

with z ~ N(0, I) and x̂0_{i−k} the x̂0 of k steps before (zero before the first step). A model
with a learned variance (fastddpm/variance.py) makes σ per element: σ · exp(s · w), w from its
variance channels and s = `sigma_slope` of the row (0 in every other table).
`kernels.reverse_step` evaluates exactly this, reading row i of `coef` (columns COEF_FIELDS).
The built-in samplers step from x̂0's and x_t alone (c = 0): DDPM's posterior mean, DDIM with the
ε that x̂0 implies, the multistep solvers' data prediction (fastddpm/solvers.py: DPM-Solver++(2M)
and (3M), UniPC); c·ε is the model's raw ε, for updates that take it beside x̂0.

A table's `history_kind` says what the d's weigh. "x0": as above. "eps" (iPNDM): the model's ε
of earlier steps, mixed into ε before x̂0 is formed —

    ε'     = ε + d1 · ε_{i−1} + d2 · ε_{i−2} + d3 · ε_{i−3}
    x̂0     = c_x · x_t − c_e · ε'            (clipped to [−1, 1] when the table says so)
    x_prev = a · x̂0 + b · x_t + c · ε' + σ · z

so a multistep combination Σ w_k ε_{i−k} is the row c_e·w_0, d_k = w_k/w_0 (w_0 ≠ 0).

Clipping to [−r, r] instead (diffusers' clip_sample_range) is the same form over x̂0/r
(`with_clip_range`): the kernel's x̂0 output and an x̂0 ring then hold x̂0/r, and the table's
`x0_scale` = r is what turns them back into x̂0.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from .errors import UserError
from .schedule import Schedule
from .solvers import HISTORY, UNIPC_VARIANTS, adams_bashforth, dpmpp_multistep, unipc
from .variance import LEARNED, learned_sigma

SPACINGS = ("leading", "trailing", "linspace", "quadratic", "logsnr", "tuned")
VARIANCES = ("fixed_large", "fixed_small", *LEARNED)
HISTORY_KINDS = ("x0", "eps")  # what a table's d columns weigh (see the module docstring)
# d1..dk weigh the x̂0 (or ε) of the k previous steps (as many as solvers.HISTORY); σ's slope in
# the model's variance channels and σ stay last
COEF_FIELDS = ("c_x", "c_e", "a", "b", "c", *(f"d{k}" for k in range(1, HISTORY + 1)),
               "sigma_slope", "sigma")


@dataclass(frozen=True, eq=False)
class SamplerTable:
    name: str
    timesteps: torch.Tensor  # int64 (S,): the model's t at each step, descending
    # float64 (S,): the ᾱ each step forms x̂0 at — the schedule's at t, but 2^-24 where that is 0
    # in the multistep solvers' tables (`_multistep_table`)
    alphas_cumprod: torch.Tensor
    coef: torch.Tensor  # float64 (S, len(COEF_FIELDS)): columns COEF_FIELDS
    clip: bool  # clip the kernel's x̂0 (x̂0/x0_scale) to [−1, 1]
    history_kind: str = "x0"  # x0 | eps: what d1..d3 weigh, and what the history ring keeps
    # the learned variance (variance.LEARNED) whose channels a step reads; None: σ is the row's
    learned_variance: str | None = None
    # the kernel's x̂0 output (the x̂0 ring, progressive x̂0) is x̂0/x0_scale (`with_clip_range`)
    x0_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.history_kind not in HISTORY_KINDS:
            raise ValueError(f"history_kind must be one of {HISTORY_KINDS}, not {self.history_kind!r}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def history(self) -> int:
        """How many earlier x̂0's (or ε's) a step reads: the last d_k column with a nonzero entry."""
        first = COEF_FIELDS.index("d1")
        used = (self.coef[:, first:first + HISTORY] != 0).any(dim=0).nonzero()
        return int(used.max()) + 1 if len(used) else 0


def with_clip_range(table: SamplerTable, r: float) -> SamplerTable:
    """`table` clipping x̂0 to [−r, r] instead of [−1, 1], with the kernel unchanged: x̂0's row
    (c_x, c_e) over r makes it form x̂0/r, clipped to [−1, 1], i.e. x̂0 clipped to [−r, r] over r;
    what weighs that x̂0 — a, and d_k of an x̂0 ring, which then holds x̂0/r too — times r gives
    the same x_prev. An ε ring (history_kind "eps") holds the model's ε, its d_k stay; b, c and
    σ weigh x_t and ε. Consumers of the kernel's x̂0 multiply it by `x0_scale` = r."""
    if r == 1.0:
        return table
    coef = table.coef.clone()
    scaled = ["a", *([f"d{k}" for k in range(1, HISTORY + 1)] if table.history_kind == "x0" else [])]
    coef[:, [COEF_FIELDS.index("c_x"), COEF_FIELDS.index("c_e")]] /= r
    coef[:, [COEF_FIELDS.index(name) for name in scaled]] *= r
    return replace(table, coef=coef, x0_scale=table.x0_scale * r)


def timestep_sequence(schedule: Schedule, steps: int | None, spacing: str | Sequence[int] = "leading",
                      start: int | None = None) -> list[int]:
    """The model timesteps visited, descending. `steps=None` visits all T of them; `start=t`
    keeps only those ≤ t (a chain begun at x_t). `spacing` names a grid (SPACINGS) or is the
    grid itself: `steps` distinct descending timesteps, e.g. a model's tuned grid.

    leading, trailing, linspace: as diffusers names them. quadratic: the DDIM paper's CIFAR-10
    grid, ⌊(i·√(0.8T)/(S−1))²⌋ for i = 0..S−1. logsnr: uniform in λ = log(ᾱ/(1−ᾱ)) of this
    schedule — S+1 points from λ(T−1) to λ(0), the S noisiest visited (each at the t of nearest λ);
    the last step then lands on ᾱ = 1 where the grid's end, t = 0, lies within one β_1 of it.
    tuned: a model's own grid (`DiffusionModel.table` resolves the name; `fastddpm tune-steps`)."""
    T = schedule.num_timesteps
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise UserError(f"steps must be between 1 and {T} (the model's T), got {steps}")
    if not isinstance(spacing, str):
        visited = _checked_grid(spacing, steps, T)
    else:
        visited = [int(t) for t in _named_grid(schedule, steps, spacing)[::-1]]
    if start is None:
        return visited
    if not 0 <= start < T:
        raise UserError(f"start timestep must be in [0, {T}), got {start}")
    kept = [t for t in visited if t <= start]
    if not kept:
        name = spacing if isinstance(spacing, str) else "given"
        raise UserError(f"no visited timestep is ≤ {start} with {steps} {name} steps; "
                        "use more steps or a later start")
    return kept


def _named_grid(schedule: Schedule, steps: int, spacing: str) -> np.ndarray:
    """Grid `spacing` of `steps` timesteps, ascending."""
    T = schedule.num_timesteps
    if spacing == "leading":
        return np.arange(0, steps) * (T // steps)
    if spacing == "trailing":  # diffusers' arange(T, 0, −T/S) gives S + 1 points for some T, S
        return (np.round(T - np.arange(steps) * (T / steps)) - 1)[::-1]
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()
    if spacing == "quadratic":  # the DDIM repo's "quad" skip (it truncates, as int() does)
        return _distinct(np.floor(np.linspace(0.0, np.sqrt(0.8 * T), steps) ** 2), T)
    if spacing == "logsnr":
        ac = schedule.alphas_cumprod.numpy()
        if ac[-1] == 0:
            raise UserError("the logsnr spacing needs ᾱ > 0 at t = T; this schedule has zero "
                            "terminal SNR (diffusers' rescale_betas_zero_snr), where λ = −∞")
        lam = np.log(ac) - np.log1p(-ac)  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], steps + 1)[:steps]  # noisiest first
        return _distinct(_nearest_t(lam, targets)[::-1], T)
    if spacing == "tuned":
        raise UserError("the tuned spacing is a model's own grid: sample through the model "
                        "(DiffusionModel.table), or make one with `fastddpm tune-steps`")
    raise UserError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def _nearest_t(lam: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, the t whose λ (decreasing in t, shape (T,)) lies nearest."""
    rising = lam[::-1]  # λ at t = T−1 .. 0, ascending
    upper = np.clip(np.searchsorted(rising, targets), 1, len(lam) - 1)
    below_nearer = targets - rising[upper - 1] <= rising[upper] - targets
    index = np.where(below_nearer, upper - 1, upper)
    return len(lam) - 1 - index


def _distinct(ts: np.ndarray, T: int) -> np.ndarray:
    """Ascending timesteps made strictly increasing within [0, T): where rounding merged
    neighbours (many steps on a grid dense at one end), each is moved up, then down, by the least
    that separates it; grids without such collisions pass unchanged."""
    out = ts.astype(np.int64)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    out[-1] = min(out[-1], T - 1)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - 1)
    return out


def _checked_grid(grid: Sequence[int], steps: int, T: int) -> list[int]:
    """An explicit grid, checked: `steps` distinct integer timesteps in [0, T), descending."""
    ts = [int(t) for t in grid]
    if len(ts) != steps or any(t != g for t, g in zip(ts, grid, strict=True)):
        raise UserError(f"a time grid must list {steps} integer timesteps, got {list(grid)}")
    if not all(0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise UserError(f"a time grid's timesteps must descend strictly within [0, {T}), got {ts}")
    return ts


def _alphas_cumprod_pairs(schedule: Schedule, ts: list[int], final: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ at each visited t and at the t it steps to (`final` after the last step)."""
    ac = schedule.alphas_cumprod
    ac_t = ac[ts]
    ac_prev = torch.cat([ac[ts[1:]], torch.full((1,), final, dtype=torch.float64)])
    return ac_t, ac_prev


def _table(name: str, ts: list[int], clip: bool, ac_t: torch.Tensor, *, history_kind: str = "x0",
           learned: str | None = None, **cols) -> SamplerTable:
    """The table of an ε-prediction model (prediction.for_prediction rewrites it for others); at
    ᾱ_t = 0 (zero terminal SNR) its x̂0 row is infinite, as x̂0 from ε is undefined there."""
    coef = torch.zeros(len(ts), len(COEF_FIELDS), dtype=torch.float64)
    coef[:, 0] = ac_t.rsqrt()  # c_x = 1/√ᾱ_t        (x̂0 from eq. 4 solved for x0)
    coef[:, 1] = (1.0 / ac_t - 1.0).sqrt()  # c_e = √(1/ᾱ_t − 1)
    for key, value in cols.items():
        coef[:, COEF_FIELDS.index(key)] = value
    return SamplerTable(name, torch.tensor(ts, dtype=torch.int64), ac_t, coef, clip,
                        history_kind=history_kind, learned_variance=learned)


def ddpm_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
               clip: bool, variance: str, start: int | None = None) -> SamplerTable:
    """Ancestral sampling, Algorithm 2; with steps < T, over a sub-sequence of timesteps with
    β re-derived from the ᾱ ratio of consecutive visited steps (as diffusers does)."""
    if variance not in VARIANCES:
        raise UserError(f"unknown variance type {variance!r}; choose one of {', '.join(VARIANCES)}")
    ts = timestep_sequence(schedule, steps, spacing, start)
    ac_t, ac_prev = _alphas_cumprod_pairs(schedule, ts)
    alpha = ac_t / ac_prev
    beta = 1.0 - alpha
    # μ̃ = √ᾱ_prev β/(1−ᾱ_t) x̂0 + √α (1−ᾱ_prev)/(1−ᾱ_t) x_t   (eq. 7)
    a = ac_prev.sqrt() * beta / (1.0 - ac_t)
    b = alpha.sqrt() * (1.0 - ac_prev) / (1.0 - ac_t)
    # σ² = β ("fixed_large") or β̃ = β (1−ᾱ_prev)/(1−ᾱ_t) ("fixed_small"); a learned variance
    # sets σ per element between them (variance.learned_sigma); z = 0 at the last step
    posterior = beta * (1.0 - ac_prev) / (1.0 - ac_t)
    learned = variance if variance in LEARNED else None
    if learned:
        sigma, slope = learned_sigma(learned, beta, posterior)
    else:
        sigma = (beta if variance == "fixed_large" else posterior).sqrt()
        slope = torch.zeros_like(sigma)
    sigma[-1] = slope[-1] = 0.0
    return _table("ddpm", ts, clip, ac_t, learned=learned, a=a, b=b, sigma_slope=slope, sigma=sigma)


def ddim_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
               clip: bool, eta: float = 0.0, set_alpha_to_one: bool = True,
               start: int | None = None) -> SamplerTable:
    """DDIM (Song et al. 2021, eq. 12) from each visited t to the next visited one:
    x_prev = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z, with ε̂ = (x_t − √ᾱ_t x̂0)/√(1 − ᾱ_t) the
    noise that the (possibly clipped) x̂0 implies, so the update is linear in x̂0 and x_t alone,
    like DDPM's posterior mean. Unclipped, ε̂ is the model's ε; clipped, it keeps x̂0 and the
    direction to x_t consistent (GLIDE; diffusers' `use_clipped_model_output=True`). With the
    model's raw ε beside a clipped x̂0 instead, deterministic DDIM drifts as steps grow (see the
    bundled model's quality_vs_steps).

    diffusers steps back by T // steps whatever the spacing; for 'leading' and 'trailing' that is
    the next visited step, for 'linspace' it is not, and we follow the paper.

    The last step goes to ᾱ = 1, or with `set_alpha_to_one=False` to ᾱ_0 of the schedule (its
    first t), as diffusers' DDIMScheduler does then; that setting is DDIM's alone, the other
    samplers end at ᾱ = 1 as their diffusers schedulers do."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must be in [0, 1], got {eta}")
    ts = timestep_sequence(schedule, steps, spacing, start)
    final = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0])
    ac_t, ac_prev = _alphas_cumprod_pairs(schedule, ts, final)
    # σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (eq. 16)
    sigma = eta * ((1.0 - ac_prev) / (1.0 - ac_t) * (1.0 - ac_t / ac_prev)).sqrt()
    return _table("ddim", ts, clip, ac_t, **_ddim_update(ac_t, ac_prev, sigma), sigma=sigma)


def _ddim_update(ac_t: torch.Tensor, ac_prev: torch.Tensor, sigma: torch.Tensor | float = 0.0
                 ) -> dict[str, torch.Tensor]:
    """DDIM's a, b: √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ with ε̂ = (x_t − √ᾱ_t x̂0)/√(1 − ᾱ_t)."""
    direction = (1.0 - ac_prev - sigma**2).clamp(min=0.0).sqrt() / (1.0 - ac_t).sqrt()
    return {"a": ac_prev.sqrt() - direction * ac_t.sqrt(), "b": direction}


def ipndm_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
                clip: bool, order: int = 4, start: int | None = None) -> SamplerTable:
    """iPNDM (solvers.adams_bashforth): deterministic DDIM from each visited t to the next with
    ε' = Σ_k w_k ε_{i−k}, the Adams–Bashforth combination of the last min(order, i + 1) ε's, in
    place of ε — x̂0 = (x_t − √(1−ᾱ_t) ε')/√ᾱ_t (clipped), and the direction the clipped x̂0
    implies, as `ddim_table`. An ε-history table: w_0 goes into c_e, w_k/w_0 into d_k."""
    ts = timestep_sequence(schedule, steps, spacing, start)
    ac_t, ac_prev = _alphas_cumprod_pairs(schedule, ts)
    weights = torch.from_numpy(adams_bashforth(len(ts), order))
    ratios = {f"d{k}": weights[:, k] / weights[:, 0] for k in range(1, HISTORY + 1)}
    name = "ipndm" if order == 4 else f"ipndm{order}"
    table = _table(name, ts, clip, ac_t, history_kind="eps", **_ddim_update(ac_t, ac_prev), **ratios)
    table.coef[:, COEF_FIELDS.index("c_e")] *= weights[:, 0]
    return table


def _multistep_table(name: str, schedule: Schedule, steps: int | None, spacing: str,
                     start: int | None, clip: bool, solve: Callable[..., np.ndarray]) -> SamplerTable:
    """A solver of fastddpm/solvers.py over the visited grid: its forms (b, a, d1 … dk) per step.
    Where ᾱ_t = 0 (t = T of a zero-terminal-SNR schedule) it takes ᾱ_t = 2^-24, as diffusers'
    DPMSolverMultistep and UniPCMultistep schedulers do: their λ and σ/α need ᾱ > 0."""
    ts = timestep_sequence(schedule, steps, spacing, start)
    ac_t, ac_prev = _alphas_cumprod_pairs(schedule, ts)
    ac_t = torch.where(ac_t == 0, 2.0**-24, ac_t)
    forms = torch.from_numpy(solve(ac_t.numpy(), ac_prev.numpy()))
    history = {f"d{k}": forms[:, 1 + k] for k in range(1, HISTORY + 1)}
    return _table(name, ts, clip, ac_t, b=forms[:, 0], a=forms[:, 1], **history)


def dpmpp_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
                clip: bool, order: int = 2, start: int | None = None) -> SamplerTable:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) or (3M), as diffusers' multistep scheduler
    with lower_order_final: first order at the first and the last step (x_0 = x̂0), second at
    the second (3M) and, under 15 steps, at the one before the last (solvers.dpmpp_multistep)."""
    name = "dpm++" if order == 2 else f"dpm++{order}m"
    return _multistep_table(name, schedule, steps, spacing, start, clip,
                            lambda ac_t, ac_next: dpmpp_multistep(ac_t, ac_next, order))


def dpmpp_2m_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
                   clip: bool, start: int | None = None) -> SamplerTable:
    return dpmpp_table(schedule, steps, spacing, clip=clip, order=2, start=start)


def dpmpp_3m_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
                   clip: bool, start: int | None = None) -> SamplerTable:
    return dpmpp_table(schedule, steps, spacing, clip=clip, order=3, start=start)


def unipc_table(schedule: Schedule, steps: int | None = None, spacing: str = "leading", *,
                clip: bool, order: int = 2, variant: str = "bh2", start: int | None = None
                ) -> SamplerTable:
    """UniPC (Zhao et al. 2023) with B(h) `variant` (bh1 | bh2), UniP-p predictor and UniC-p
    corrector on the model output the next step computes anyway (NFE = steps), as diffusers'
    UniPCMultistepScheduler(predict_x0=True, lower_order_final=True): order min(p, steps left,
    points seen) at each step (solvers.unipc)."""
    if variant not in UNIPC_VARIANTS:
        raise UserError(f"unknown UniPC variant {variant!r}; choose one of {', '.join(UNIPC_VARIANTS)}")
    name = "unipc" + ("" if order == 2 else str(order)) + ("" if variant == "bh2" else f"-{variant}")
    return _multistep_table(name, schedule, steps, spacing, start, clip,
                            lambda ac_t, ac_next: unipc(ac_t, ac_next, order, variant))


@dataclass(frozen=True)
class SamplerSpec:
    build: Callable[..., SamplerTable]  # (schedule, steps, spacing, *, clip, start, **options)
    options: tuple[str, ...]  # what it takes beyond steps, spacing, clip and start


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm_table, ("variance",)),  # the variance is the model's, not a choice
    "ddim": SamplerSpec(ddim_table, ("eta", "set_alpha_to_one")),  # the latter is the model's
    "dpm++": SamplerSpec(dpmpp_2m_table, ()),  # DPM-Solver++(2M)
    "dpm++3m": SamplerSpec(dpmpp_3m_table, ()),  # DPM-Solver++(3M)
    "unipc": SamplerSpec(partial(unipc_table, order=2, variant="bh2"), ()),  # diffusers' default
    "unipc-bh1": SamplerSpec(partial(unipc_table, order=2, variant="bh1"), ()),
    "unipc3": SamplerSpec(partial(unipc_table, order=3, variant="bh2"), ()),
    "unipc3-bh1": SamplerSpec(partial(unipc_table, order=3, variant="bh1"), ()),
    "ipndm": SamplerSpec(partial(ipndm_table, order=4), ()),  # the classic: up to 4 ε's
    "ipndm2": SamplerSpec(partial(ipndm_table, order=2), ()),
    "ipndm3": SamplerSpec(partial(ipndm_table, order=3), ()),
}


def make_table(schedule: Schedule, sampler: str, steps: int | None, spacing: str, *, clip: bool,
               start: int | None = None, **options) -> SamplerTable:
    """The table for a sampler by name (see SAMPLERS). `start=t` begins the chain at x_t instead
    of x_T (the visited steps ≤ t). An option the sampler does not take is refused, not dropped."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    unused = sorted(set(options) - set(spec.options))
    if unused:
        raise UserError(f"the {sampler} sampler takes no {', '.join(unused)}")
    return spec.build(schedule, steps, spacing, clip=clip, start=start, **options)
