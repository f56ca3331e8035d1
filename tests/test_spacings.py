"""Time grids (samplers.timestep_sequence): the DDIM paper's quadratic grid, the grid uniform in
log-SNR, explicit grids, and the invariants every grid keeps (distinct, descending, in [0, T))."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddpm.errors import UserError
from fastddpm.samplers import SPACINGS, make_table, timestep_sequence
from fastddpm.schedule import Schedule, ScheduleConfig

LINEAR = Schedule(ScheduleConfig("linear", 1000))
NAMED = [s for s in SPACINGS if s != "tuned"]


def _log_snr(schedule: Schedule) -> np.ndarray:
    ac = schedule.alphas_cumprod.numpy()
    return np.log(ac / (1.0 - ac))


def test_quadratic_is_the_ddim_papers_grid():
    """t_i = ⌊0.8 T (i/(S−1))²⌋: for S = 5, 800·(0, 1/16, 1/4, 9/16, 1) exactly."""
    assert timestep_sequence(LINEAR, 5, "quadratic") == [800, 450, 200, 50, 0]
    for steps in (4, 10, 20, 28):  # the DDIM repo's seq, written out as it computes it
        seq = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2]
        assert timestep_sequence(LINEAR, steps, "quadratic") == seq[::-1]


def test_quadratic_separates_what_truncation_merges():
    """At 50 steps the DDIM repo's seq starts 0, 0, 1, 2, 5: it would visit t = 0 twice. Ours
    moves the merged ones up by the least that separates them and keeps the rest."""
    seq = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), 50) ** 2]
    assert seq[:5] == [0, 0, 1, 2, 5]
    assert timestep_sequence(LINEAR, 50, "quadratic")[::-1] == [0, 1, 2, 3, 5] + seq[5:]


def test_logsnr_is_uniform_where_log_snr_is_linear_in_t():
    """A schedule built so that λ(t) = 6 − 0.012 t over T = 1001: λ's grid of S + 1 points from
    λ(1000) to λ(0) lands on t = 1000, 900, ..., 100 for S = 10 (the S noisiest points)."""
    T = 1001
    lam = 6.0 - 0.012 * np.arange(T)
    ac = 1.0 / (1.0 + np.exp(-lam))
    betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
    schedule = Schedule(ScheduleConfig("custom", T, betas=betas.tolist()))
    assert np.allclose(_log_snr(schedule), lam)
    assert timestep_sequence(schedule, 10, "logsnr") == list(range(1000, 99, -100))
    assert timestep_sequence(schedule, 4, "logsnr") == [1000, 750, 500, 250]


@pytest.mark.parametrize("steps", [4, 5, 8, 10, 20])
def test_logsnr_on_the_linear_schedule_steps_evenly_in_log_snr(steps):
    lam = _log_snr(LINEAR)
    ts = timestep_sequence(LINEAR, steps, "logsnr")
    assert ts[0] == 999
    targets = lam[999] + np.arange(steps) * (lam[0] - lam[999]) / steps
    for t, target in zip(ts, targets, strict=True):  # the t of nearest λ, no other t nearer
        assert abs(lam[t] - target) <= np.abs(lam - target).min() + 1e-12


@settings(max_examples=60, deadline=None)
@given(T=st.integers(2, 400), data=st.data())
def test_every_named_grid_is_distinct_descending_and_in_range(T, data):
    """Rounding merges neighbours where a grid is dense (quadratic and logsnr near t = 0 at
    many steps); the grid must still visit `steps` distinct timesteps."""
    schedule = Schedule(ScheduleConfig("linear", T, 1e-4, min(0.02 * 1000 / T, 0.5)))
    steps = data.draw(st.integers(1, T))
    for spacing in NAMED:
        ts = timestep_sequence(schedule, steps, spacing)
        assert len(ts) == steps, spacing
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False)), spacing
        assert 0 <= ts[-1] and ts[0] < T, spacing


def test_grids_without_collisions_are_left_alone():
    """The collision fix-up changes nothing where rounding merged no neighbours."""
    seq = [int(s) for s in np.linspace(0, math.sqrt(800), 25) ** 2]
    assert len(set(seq)) == 25 and timestep_sequence(LINEAR, 25, "quadratic") == seq[::-1]


def test_an_explicit_grid_is_used_as_given_and_cut_at_start():
    grid = (990, 700, 321, 40, 3)
    assert timestep_sequence(LINEAR, 5, grid) == list(grid)
    assert timestep_sequence(LINEAR, 5, grid, start=500) == [321, 40, 3]
    table = make_table(LINEAR, "ddim", 5, grid, clip=True)
    assert table.timesteps.tolist() == list(grid)


@pytest.mark.parametrize(("grid", "message"), [
    ((990, 700, 321), "must list 5 integer timesteps"),  # too few for the step count
    ((990, 700, 321.5, 40, 3), "must list 5 integer timesteps"),  # not an integer
    ((990, 700, 700, 40, 3), "descend strictly"),  # repeated
    ((3, 40, 321, 700, 990), "descend strictly"),  # ascending
    ((1000, 700, 321, 40, 3), "descend strictly within"),  # past T − 1
    ((990, 700, 321, 40, -1), "descend strictly within"),  # below 0
])
def test_a_bad_explicit_grid_is_refused(grid, message):
    with pytest.raises(UserError, match=message):
        timestep_sequence(LINEAR, 5, grid)


def test_tuned_by_name_outside_a_model_names_the_command():
    with pytest.raises(UserError, match="tune-steps"):
        make_table(LINEAR, "ddim", 5, "tuned", clip=True)


def test_trailing_has_as_many_steps_as_asked():
    """Was: arange(75, 0, −75/7) holds 8 points (float steps), so 7 trailing steps visited 8."""
    schedule = Schedule(ScheduleConfig("linear", 75, 1e-4, 0.2))
    ts = timestep_sequence(schedule, 7, "trailing")
    assert ts == [74, 63, 53, 42, 31, 20, 10]  # round(75 − 75 i/7) − 1
