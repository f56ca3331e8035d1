"""Schedule tables against independent float64 formulas written element by element."""
import math

import numpy as np
import pytest
import torch

from fastddpm.errors import UserError
from fastddpm.schedule import Schedule, ScheduleConfig


def _independent_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The same tables by plain Python loops over float64 numbers (no vectorised shortcuts)."""
    T = len(betas)
    ac, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ac.append(prod)
    ac_prev = [1.0] + ac[:-1]
    post_var = [betas[t] * (1 - ac_prev[t]) / (1 - ac[t]) for t in range(T)]
    return {
        "alphas": np.array([1 - b for b in betas]),
        "alphas_cumprod": np.array(ac),
        "alphas_cumprod_prev": np.array(ac_prev),
        "sqrt_alphas_cumprod": np.array([math.sqrt(a) for a in ac]),
        "sqrt_one_minus_alphas_cumprod": np.array([math.sqrt(1 - a) for a in ac]),
        "sqrt_recip_alphas_cumprod": np.array([1 / math.sqrt(a) for a in ac]),
        "sqrt_recipm1_alphas_cumprod": np.array([math.sqrt(1 / a - 1) for a in ac]),
        "posterior_variance": np.array(post_var),
        "posterior_log_variance_clipped": np.array([math.log(post_var[max(t, 1)]) for t in range(T)]),
        "posterior_mean_coef1": np.array([betas[t] * math.sqrt(ac_prev[t]) / (1 - ac[t]) for t in range(T)]),
        "posterior_mean_coef2": np.array([(1 - ac_prev[t]) * math.sqrt(1 - betas[t]) / (1 - ac[t])
                                          for t in range(T)]),
    }


@pytest.mark.parametrize("kind", ["linear", "cosine", "quadratic"])
def test_tables_match_independent_formulas(kind):
    sched = Schedule(ScheduleConfig(kind=kind, num_timesteps=1000))
    assert sched.betas.dtype == torch.float64 and sched.betas.shape == (1000,)
    for name, expected in _independent_tables(sched.betas.numpy()).items():
        got = getattr(sched, name)
        assert got.dtype == torch.float64, name
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0, err_msg=name)


def test_beta_schedules_follow_their_papers():
    lin = Schedule(ScheduleConfig("linear")).betas
    assert lin[0].item() == pytest.approx(1e-4, rel=1e-15)
    assert lin[-1].item() == pytest.approx(0.02, rel=1e-15)
    quad = Schedule(ScheduleConfig("quadratic")).betas.numpy()
    np.testing.assert_allclose(np.sqrt(quad), np.linspace(1e-2, math.sqrt(0.02), 1000), rtol=1e-12)
    # cosine: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), while β stays under 0.999
    cos = Schedule(ScheduleConfig("cosine", num_timesteps=50))
    f = [math.cos(((t / 50) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(51)]
    np.testing.assert_allclose(cos.alphas_cumprod.numpy()[:-1], [f[t + 1] / f[0] for t in range(49)],
                               rtol=1e-10)
    assert cos.betas.max().item() <= 0.999


def test_custom_betas_round_trip():
    betas = list(np.random.default_rng(0).uniform(1e-4, 0.05, size=17))
    sched = Schedule(ScheduleConfig(kind="custom", num_timesteps=17, betas=betas))
    np.testing.assert_array_equal(sched.betas.numpy(), np.array(betas))
    assert Schedule(ScheduleConfig.from_dict(sched.config.to_dict())).betas.equal(sched.betas)


@pytest.mark.parametrize("betas", [[0.1], [1.0, 0.1], [0.1, 1.0, 0.1], [0.1, 1.5], [0.0, 0.1], [0.2, -0.1]])
def test_invalid_betas_are_refused(betas):
    with pytest.raises(UserError):
        Schedule(ScheduleConfig(kind="custom", num_timesteps=len(betas), betas=betas))


def test_zero_terminal_snr_matches_diffusers_rescale():
    """Lin et al.'s rescale against diffusers' own function run on float64 betas: β_T = 1,
    ᾱ_T = 0, √ᾱ_1 kept; the schedule accepts it, and rescaling it again changes nothing."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from fastddpm.schedule import make_betas, zero_terminal_snr

    betas = make_betas("quadratic", 1000, 8.5e-4, 0.012)
    ours = zero_terminal_snr(betas)
    torch.testing.assert_close(ours, rescale_zero_terminal_snr(betas.clone()), rtol=1e-12, atol=0)
    assert ours[-1] == 1.0 and ours[0].item() == pytest.approx(betas[0].item(), rel=1e-12)
    sched = Schedule(ScheduleConfig("custom", 1000, betas=ours.tolist()))
    assert sched.alphas_cumprod[-1] == 0 and bool(torch.isfinite(sched.posterior_log_variance_clipped).all())
    assert torch.equal(zero_terminal_snr(ours), ours)


def test_unknown_kind_is_refused():
    with pytest.raises(UserError, match="unknown beta schedule"):
        Schedule(ScheduleConfig(kind="sigmoid"))


def test_q_sample_closed_form():
    sched = Schedule(ScheduleConfig())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 998, 999])
    got = sched.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ac = float(np.prod([1 - b for b in sched.betas[: ti + 1].tolist()]))
        expected = math.sqrt(ac) * x0[i] + math.sqrt(1 - ac) * noise[i]
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fields, says", [
    (dict(kind="custom", num_timesteps=50), "a custom schedule needs its betas"),
    (dict(kind="linear", num_timesteps=2, betas=[0.1, 0.2]), "betas are for kind 'custom'"),
])
def test_validate_refuses_betas_that_do_not_go_with_the_kind(fields, says):
    """Refused by the config's own check, before any table is built (a custom schedule without
    betas used to pass validate() and fail only in make_betas; a linear one ignored its betas)."""
    with pytest.raises(UserError, match=says):
        ScheduleConfig.from_dict(fields)
    with pytest.raises(UserError, match=says):  # made in code: Schedule checks it the same way
        Schedule(ScheduleConfig(**fields))
