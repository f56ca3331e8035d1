"""Sampler tables + the reference update against diffusers' schedulers, in float64.

diffusers keeps its tables in float32; we hand its schedulers our float64 tables so the
comparison checks formulas, not rounding."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers_tables import with_float64_sigmas, with_float64_tables

from fastddpm.errors import UserError
from fastddpm.kernels import reverse_step_reference
from fastddpm.samplers import (
    SAMPLERS,
    ddim_table,
    ddpm_table,
    dpmpp_2m_table,
    dpmpp_table,
    ipndm_table,
    make_table,
    timestep_sequence,
    unipc_table,
)
from fastddpm.schedule import Schedule, ScheduleConfig

T = 1000
SCHEDULE = Schedule(ScheduleConfig("linear", T))
SHAPE = (3, 2, 5, 5)


def _eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A stand-in ε-model: a smooth function of (x, t) so each step sees different inputs."""
    return torch.tanh(0.9 * x + t / T) + 0.05 * torch.sin(3.0 * x)


def _noises(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(n)]


def _run_ours(table, x: torch.Tensor, zs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Our reference update row by row, with the history (x̂0's, or ε's) newest first."""
    out, history = [], []
    eps_history = table.history_kind == "eps"
    for i, t in enumerate(table.timesteps.tolist()):
        eps = _eps(x, t)
        x, x0 = reverse_step_reference(x, eps, table.coef[i], zs[i], history, table.clip,
                                       eps_history=eps_history)
        history = [eps if eps_history else x0, *history][:table.history]
        out.append(x)
    return out


def _assert_trajectories_close(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        assert not torch.isnan(a).any()
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-6, f"step {i}: relative error {rel:.3g}"


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing,steps", [("leading", 1000), ("leading", 20), ("trailing", 20),
                                           ("linspace", 20), ("leading", 7), ("trailing", 13)])
def test_ddpm_matches_diffusers(variance, clip, spacing, steps, monkeypatch):
    table = ddpm_table(SCHEDULE, steps, spacing, variance=variance, clip=clip)
    sched = with_float64_tables(DDPMScheduler(num_train_timesteps=T, variance_type=variance,
                                          clip_sample=clip, timestep_spacing=spacing), SCHEDULE)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == table.timesteps.tolist()
    n = 60 if steps == T else steps  # a full 1000-step chain: compare its first 60 steps
    zs = _noises(n, seed=steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = _run_ours(table, x.clone(), zs + [torch.zeros(SHAPE, dtype=torch.float64)] * (steps - n))[:n]

    queue = list(zs)
    # diffusers draws its own noise; hand it ours. It also adds noise after the last step when
    # that step's t > 0 ('trailing'); we never do (Algorithm 2: z = 0 at the end), so zero it there.
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: queue.pop(0))
    theirs, xd = [], x.clone()
    for i, t in enumerate(sched.timesteps[:n].tolist()):
        if i == steps - 1:
            queue = [torch.zeros(SHAPE, dtype=torch.float64)]
        xd = sched.step(_eps(xd, t), t, xd).prev_sample
        theirs.append(xd)
    _assert_trajectories_close(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing,steps", [("leading", 50), ("trailing", 50), ("leading", 1000),
                                           ("trailing", 10), ("leading", 3)])
def test_ddim_matches_diffusers(eta, clip, spacing, steps):
    table = ddim_table(SCHEDULE, steps, spacing, eta=eta, clip=clip)
    sched = with_float64_tables(DDIMScheduler(num_train_timesteps=T, clip_sample=clip,
                                          timestep_spacing=spacing, set_alpha_to_one=True), SCHEDULE)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == table.timesteps.tolist()
    n = min(steps, 60)
    zs = _noises(steps, seed=7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = _run_ours(table, x.clone(), zs)[:n]
    theirs, xd = [], x.clone()
    for i, t in enumerate(sched.timesteps[:n].tolist()):
        xd = sched.step(_eps(xd, t), t, xd, eta=eta, variance_noise=zs[i],
                        use_clipped_model_output=True).prev_sample
        theirs.append(xd)
    _assert_trajectories_close(ours, theirs)


def test_ddim_linspace_steps_to_the_next_visited_timestep():
    """diffusers' DDIM steps back by T//steps whatever the spacing; we step to the next visited t
    (the paper's sub-sequence τ). Check 'linspace' against eq. 12 written out directly."""
    table = ddim_table(SCHEDULE, 9, "linspace", eta=0.5, clip=False)
    ts = table.timesteps.tolist()
    assert ts == timestep_sequence(SCHEDULE, 9, "linspace") and ts[0] == 999 and ts[-1] == 0
    ac = SCHEDULE.alphas_cumprod.tolist()
    zs = _noises(9, seed=3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = _run_ours(table, x.clone(), zs)
    for i, t in enumerate(ts):
        a_t, a_prev = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        eps = _eps(x, t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * zs[i]
        torch.testing.assert_close(ours[i], x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("order,spacing,steps", [(2, "leading", 12), (2, "trailing", 5), (3, "trailing", 5),
                                                 (3, "leading", 12), (3, "linspace", 20), (3, "trailing", 2)])
def test_dpmpp_multistep_matches_diffusers(order, spacing, steps, clip):
    """DPM-Solver++(2M)/(3M) with lower-order final steps (under 15 steps the second-last step is
    second order at most; 20 steps: third order up to the last step), and 2 steps for (3M):
    first order throughout. diffusers is handed our float64 σ grid; its step() still casts the
    sample to float32 (its x̂0's stay float64), the rounding the 1e-6 below allows for."""
    from diffusers import DPMSolverMultistepScheduler

    table = dpmpp_table(SCHEDULE, steps, spacing, order=order, clip=clip)
    assert table.history == min(order - 1, max(steps - 2, 0))
    sched = with_float64_sigmas(DPMSolverMultistepScheduler(num_train_timesteps=T, solver_order=order,
                                                            algorithm_type="dpmsolver++",
                                                            lower_order_final=True, final_sigmas_type="zero"),
                                SCHEDULE, table.timesteps.tolist())
    ours, theirs = _both_multistep(table, sched, seed=5, clip=clip)
    _assert_trajectories_close(ours, theirs)


def _both_multistep(table, sched, seed: int, clip: bool) -> tuple[list, list]:
    """Our trajectory and a diffusers multistep scheduler's from one random x_T (float64), each
    diffusers step handed the ε of its clipped x̂0 where `clip`."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = _run_ours(table, x.clone(), [None] * table.num_steps)
    theirs, xd = [], x.clone()
    for t in table.timesteps.tolist():
        xd = sched.step(_clipped_x0_as_eps(xd, t, clip), t, xd).prev_sample
        theirs.append(xd)
    return ours, theirs


def _clipped_x0_as_eps(x: torch.Tensor, t: int, clip: bool) -> torch.Tensor:
    """The stand-in ε, or — with clip — the ε whose x̂0 is the clipped one: diffusers' multistep
    schedulers clip only through dynamic thresholding, so they are handed the clipped x̂0 this way."""
    eps = _eps(x, t)
    if not clip:
        return eps
    ac = SCHEDULE.alphas_cumprod[t]
    x0 = ((x - (1 - ac).sqrt() * eps) / ac.sqrt()).clamp(-1.0, 1.0)
    return (x - ac.sqrt() * x0) / (1 - ac).sqrt()


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order,spacing,steps", [(2, "trailing", 5), (2, "leading", 12), (3, "trailing", 6),
                                                 (3, "linspace", 20), (3, "leading", 2), (2, "trailing", 1)])
def test_unipc_matches_diffusers(order, variant, spacing, steps, clip):
    """UniPC-p (predictor and the corrector that reuses the next step's model output) against
    diffusers' UniPCMultistepScheduler handed our float64 σ grid: the same timesteps, inputs and
    x̂0. Short grids (1, 2 steps) run at the order their points allow."""
    from diffusers import UniPCMultistepScheduler

    table = unipc_table(SCHEDULE, steps, spacing, order=order, variant=variant, clip=clip)
    sched = with_float64_sigmas(UniPCMultistepScheduler(num_train_timesteps=T, solver_order=order,
                                                        solver_type=variant, predict_x0=True,
                                                        lower_order_final=True, final_sigmas_type="zero"),
                                SCHEDULE, table.timesteps.tolist())
    ours, theirs = _both_multistep(table, sched, seed=6, clip=clip)
    if variant == "bh1":  # diffusers' bh1 last step to σ = 0 is B(h)·0 = −∞·0 = NaN (0.42.1);
        ours, theirs = ours[:-1], theirs[:-1]  # ours is x_0 = x̂0 there (checked below)
        assert theirs[-1:] == [] or not torch.isnan(theirs[-1]).any()
    _assert_trajectories_close(ours, theirs)


def test_every_registered_sampler_builds_and_ends_at_x0():
    for name in SAMPLERS:
        options = {"variance": "fixed_large"} if name == "ddpm" else {}
        table = make_table(SCHEDULE, name, 8, "trailing", clip=True, **options)
        assert table.coef.dtype == torch.float64 and torch.isfinite(table.coef).all()
        assert table.coef[-1, 2] == pytest.approx(1.0, rel=1e-12)  # a = 1: x_0 = x̂0 ...
        # ... and nothing else, no noise (an ε history's d's mix the ε that x̂0 is made of)
        rest = table.coef[-1, 5:] if table.history_kind == "x0" else table.coef[-1, [3, 4, -1]]
        assert rest.abs().max() < 1e-7


def test_last_step_has_no_noise_and_returns_x0():
    for table in (ddpm_table(SCHEDULE, 10, "trailing", variance="fixed_large", clip=True),
                  ddim_table(SCHEDULE, 10, eta=1.0, clip=True),
                  dpmpp_2m_table(SCHEDULE, 10, clip=True)):
        c_x, c_e, a, b, c, *d, sigma = table.coef[-1].tolist()
        assert sigma == 0.0 and b == pytest.approx(0.0, abs=1e-12) and c == pytest.approx(0.0, abs=1e-7)
        assert a == pytest.approx(1.0, rel=1e-12) and d == [0.0] * len(d)


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_steps_out_of_range_are_refused(steps):
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        make_table(SCHEDULE, "ddim", steps, "leading", clip=True)


def test_bad_sampler_spacing_eta_variance_are_refused():
    with pytest.raises(UserError, match="unknown sampler"):
        make_table(SCHEDULE, "euler", 10, "leading", clip=True)
    with pytest.raises(UserError, match="unknown timestep spacing"):
        make_table(SCHEDULE, "ddim", 10, "random", clip=True)
    with pytest.raises(UserError, match="eta must be in"):
        make_table(SCHEDULE, "ddim", 10, "leading", clip=True, eta=1.5)
    with pytest.raises(UserError, match="unknown variance"):
        make_table(SCHEDULE, "ddpm", 10, "leading", clip=True, variance="fixed_large_log")


@pytest.mark.parametrize(("sampler", "option"), [("ddpm", "eta"), ("dpm++", "eta"),
                                                 ("ddim", "variance"), ("dpm++", "variance")])
def test_an_option_the_sampler_does_not_take_is_refused(sampler, option):
    """Was: eta silently dropped by DDPM, the variance by DDIM."""
    with pytest.raises(UserError, match=f"takes no {option}"):
        make_table(SCHEDULE, sampler, 10, "leading", clip=True, **{option: 0.5})


# ---- iPNDM: Adams–Bashforth on ε over DDIM, against a plain float64 loop --------------------

# the weights of ε_i, ε_{i−1}, … by how many ε's exist, written out here (not imported)
AB_WEIGHTS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
              4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _ipndm_loop(ts: list[int], x: torch.Tensor, clip: bool, order: int) -> list[torch.Tensor]:
    """benchmarks/ipndm_probe.py's method, written out on its own: ε' = Σ w_k ε_{i−k} over the
    last min(order, i + 1) ε's, x̂0 from ε' (clipped), then DDIM with the ε the clipped x̂0
    implies (where it was not clipped, that is ε')."""
    ac = [*(SCHEDULE.alphas_cumprod[t].item() for t in ts), 1.0]  # ᾱ visited, then the end
    seen, out = [], []
    for i, t in enumerate(ts):
        seen.insert(0, _eps(x, t))
        mixed = sum(w * e for w, e in zip(AB_WEIGHTS[min(order, len(seen))], seen, strict=False))
        alpha, sigma = math.sqrt(ac[i]), math.sqrt(1.0 - ac[i])
        x0 = (x - sigma * mixed) / alpha
        x0 = x0.clamp(-1.0, 1.0) if clip else x0
        direction = (x - alpha * x0) / sigma
        x = math.sqrt(ac[i + 1]) * x0 + math.sqrt(1.0 - ac[i + 1]) * direction
        out.append(x)
    return out


def _given_grid(steps: int) -> list[int]:
    """A tuned-like grid: T − 1 and steps − 1 more distinct timesteps, drawn at random."""
    gen = torch.Generator().manual_seed(steps)
    rest = (torch.randperm(T - 1, generator=gen)[:steps - 1]).sort(descending=True).values
    return [T - 1, *rest.tolist()]


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "quadratic", "logsnr", "given"])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_matches_a_plain_float64_loop(order, spacing, clip, steps):
    """The table run by the reference step with its ε ring equals the probe's loop (≤ 1e-6
    relative at every step); short grids warm up through orders 1, 2, … as far as they reach."""
    grid = _given_grid(steps) if spacing == "given" else spacing
    table = ipndm_table(SCHEDULE, steps, grid, order=order, clip=clip)
    assert table.history_kind == "eps" and table.history == min(order, steps) - 1
    assert table.name == ("ipndm" if order == 4 else f"ipndm{order}")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ours = _run_ours(table, x.clone(), [None] * steps)
    _assert_trajectories_close(ours, _ipndm_loop(table.timesteps.tolist(), x.clone(), clip, order))


def test_ipndm_samplers_are_registered_with_their_orders():
    for name, order in (("ipndm", 4), ("ipndm2", 2), ("ipndm3", 3)):
        table = make_table(SCHEDULE, name, 6, "trailing", clip=True)
        assert table.name == name and table.history == order - 1
        assert torch.equal(table.coef, ipndm_table(SCHEDULE, 6, "trailing", order=order, clip=True).coef)


@pytest.mark.parametrize("sampler", ["ipndm", "ipndm2", "ipndm3"])
def test_ipndm_bad_input_is_refused(sampler):
    from fastddpm.options import SamplingOptions
    from fastddpm.prediction import for_prediction

    for option in ("eta", "variance"):
        with pytest.raises(UserError, match=f"the {sampler} sampler takes no {option}"):
            make_table(SCHEDULE, sampler, 5, "trailing", clip=True, **{option: 0.5})
    with pytest.raises(UserError, match="η is a DDIM option"):
        SamplingOptions(sampler=sampler, eta=0.0)
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        make_table(SCHEDULE, sampler, 0, "trailing", clip=True)
    with pytest.raises(UserError, match="unknown timestep spacing"):
        make_table(SCHEDULE, sampler, 5, "random", clip=True)
    with pytest.raises(UserError, match="tune-steps"):  # a tuned grid is the model's own
        make_table(SCHEDULE, sampler, 5, "tuned", clip=True)
    table = make_table(SCHEDULE, sampler, 5, "trailing", clip=True)
    for prediction in ("sample", "v_prediction"):  # the ring holds the network's output, not ε
        with pytest.raises(UserError, match="runs ε-prediction models only"):
            for_prediction(table, prediction)
    assert for_prediction(table, "epsilon") is table
