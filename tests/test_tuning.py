"""Tuned time grids: the search (fastddpm.tuning), where models keep their grids (sampling
defaults, model files), `--spacing tuned`, the default step count and grid, and `fastddpm
tune-steps` (its output, and its bad input: one line, exit 2, the model file untouched)."""
import itertools
import math

import pytest
import torch
from tiny import save_tiny, tiny_model

from fastddpm import checkpoint, tuning
from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.options import DEFAULT_SAMPLER, FALLBACK_SPACING, FAST_STEPS, SAFE_STEPS, SamplingOptions
from fastddpm.runtime import Sampler
from fastddpm.schedule import ScheduleConfig

T = 12
SCHEDULE = ScheduleConfig("linear", T, 1e-3, 0.3)  # ᾱ falls to ~0.06: a short but whole chain
CPU = SamplingOptions(device="cpu", backend="torch")


@pytest.fixture(scope="module")
def model():
    return tiny_model(schedule=SCHEDULE, sampling=SamplingDefaults(clip=False))


def test_dynamic_programming_finds_the_cheapest_path(model):
    """Against every path of 3 DDIM steps over the reference's timesteps, each edge's cost the
    RMS distance of one DDIM step (eq. 12 written out) to the reference's state where it lands."""
    steps = 3
    options = CPU.replace(sampler="ddim", steps=steps)
    ref = tuning._reference(model, options, T, calib=5, seed=3)
    ac = model.schedule.alphas_cumprod
    ts = ref.timesteps
    assert ts == list(range(T - 1, -1, -1))

    def edge(i: int, j: int) -> float:
        x, x0 = ref.states[i], ref.x0[i]
        eps = (x - ac[ts[i]].sqrt() * x0) / (1 - ac[ts[i]]).sqrt()
        a_next = ac[ts[j]] if j < T else torch.tensor(1.0, dtype=torch.float64)
        pred = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return float(((pred - ref.states[j]) ** 2).mean().sqrt())

    def cost(path: tuple[int, ...]) -> float:
        nodes = (0, *path, T)
        return sum(edge(i, j) for i, j in zip(nodes, nodes[1:], strict=False))

    best = min(itertools.combinations(range(1, T), steps - 1), key=cost)
    got = tuning._dynamic_programming(model, ref, steps, options)
    assert got == tuple(ts[i] for i in (0, *best))


def test_search_is_deterministic_and_beats_its_starts(model):
    first = tuning.tune_grid(model, "dpm++", 4, calib=6, seed=1, options=CPU)
    again = tuning.tune_grid(model, "dpm++", 4, calib=6, seed=1, options=CPU)
    assert first == again
    ts = first.timesteps
    assert len(ts) == 4 and ts[0] == T - 1 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert first.error <= min(first.start_errors.values())
    assert set(first.start_errors) == {"dp", "trailing", "logsnr"}


def test_reported_error_is_the_samplers_distance_on_the_stored_grid(model):
    """The sampler run through `--spacing tuned` on the tuned model lands where the search said:
    its mean squared distance to DDIM over all T steps from the same draws."""
    result = tuning.tune_grid(model, "ddim", 3, calib=4, seed=2, options=CPU)
    tuned = DiffusionModel(model.unet, model.schedule,
                           model.sampling.with_grid("ddim", 3, result.timesteps))
    few = Sampler(tuned, CPU.replace(sampler="ddim", steps=3, spacing="tuned")).run(2, 0, 4)
    fine = Sampler(model, CPU.replace(sampler="ddim", steps=T, spacing="trailing")).run(2, 0, 4)
    assert Sampler(tuned, CPU.replace(sampler="ddim", steps=3, spacing="tuned")).table.timesteps.tolist() \
        == list(result.timesteps)
    assert math.isclose(float(((few.double() - fine.double()) ** 2).mean()), result.error, rel_tol=1e-4)


@pytest.mark.parametrize(("sampler", "steps", "calib", "message"), [
    ("euler", 4, 8, "unknown sampler 'euler'"),
    ("ddpm", 4, 8, "draws fresh noise"),  # a stochastic sampler follows no one path
    ("dpm++", 0, 8, "steps must be between 1 and 12"),
    ("dpm++", T + 1, 8, "steps must be between 1 and 12"),
    ("dpm++", 4, 0, "calib must be positive, got 0"),
    # its reference trajectory (float64, every step) would not fit: refused before any sampling
    ("dpm++", 4, 10**12, "tuning on 1000000000000 calibration draws would take about"),
])
def test_bad_requests_are_refused(model, sampler, steps, calib, message):
    with pytest.raises(UserError, match=message):
        tuning.check_request(model, sampler, steps, calib)


def test_grids_survive_model_files(tmp_path, model):
    sampling = model.sampling.with_grid("dpm++", 3, (11, 6, 2)).with_grid("ddim", 2, (11, 4))
    sampling = sampling.with_grid("dpm++", 3, (11, 7, 1))  # replaces the first
    assert sampling.grids == (("ddim", 2, (11, 4)), ("dpm++", 3, (11, 7, 1)))
    for name in ("m.pt", "m.safetensors"):
        checkpoint.save(DiffusionModel(model.unet, model.schedule, sampling), tmp_path / name)
        assert checkpoint.load(tmp_path / name).sampling == sampling
    assert "grids" not in SamplingDefaults().to_dict()  # files without grids read as before


@pytest.mark.parametrize("grids", [
    [{"sampler": "ddim", "steps": 2, "timesteps": [4, 11]}],  # ascending
    [{"sampler": "ddim", "steps": 3, "timesteps": [11, 4]}],  # fewer than its steps
    [{"sampler": "ddim", "steps": 2, "timesteps": [11, 4.5]}],  # not integers
    [{"sampler": "ddim", "timesteps": [11, 4]}],  # no steps
    {"ddim": [11, 4]},  # not a list
])
def test_damaged_grids_are_refused(grids):
    with pytest.raises(UserError, match="grid"):
        SamplingDefaults.from_dict({"variance": "fixed_large", "clip": True, "grids": grids})


def test_tuned_spacing_needs_the_models_grid(model):
    with pytest.raises(UserError, match=r"no tuned time grid for dpm\+\+ at 3 steps; make one with "
                                        r"`fastddpm tune-steps MODEL --steps 3 --sampler dpm\+\+`"):
        model.table(CPU, sampler="dpm++", steps=3, spacing="tuned")
    tuned = DiffusionModel(model.unet, model.schedule, model.sampling.with_grid("dpm++", 3, (11, 5, 1)))
    assert tuned.table(CPU, sampler="dpm++", steps=3, spacing="tuned").timesteps.tolist() == [11, 5, 1]
    with pytest.raises(UserError, match="at 4 steps"):  # a grid for another step count
        tuned.table(CPU, sampler="dpm++", steps=4, spacing="tuned")


def test_default_steps_and_grid(model):
    """No steps, no spacing: the fast default on the sampler's tuned grid where the model has it,
    SAFE_STEPS on FALLBACK_SPACING where not; DDPM keeps the paper's T steps."""
    sampler = DEFAULT_SAMPLER
    fast = FAST_STEPS[sampler]
    safe = min(SAFE_STEPS, T)
    assert model.plan(CPU.replace(sampler=sampler)) == (safe, FALLBACK_SPACING)
    grid = tuple(range(T - 1, T - 1 - fast, -1))
    tuned = DiffusionModel(model.unet, model.schedule, model.sampling.with_grid(sampler, fast, grid))
    assert tuned.plan(CPU.replace(sampler=sampler)) == (fast, grid)
    assert tuned.plan(CPU.replace(sampler=sampler, spacing="logsnr")) == (safe, "logsnr")
    assert tuned.plan(CPU.replace(sampler=sampler, steps=fast + 1)) == (fast + 1, FALLBACK_SPACING)
    assert tuned.plan(CPU.replace(sampler="ddpm")) == (T, FALLBACK_SPACING)


def test_tune_steps_command_writes_the_grid(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    checkpoint.save(tiny_model(schedule=SCHEDULE), path)
    out = tmp_path / "tuned.pt"
    assert main(["tune-steps", str(path), "--steps", "3", "--sampler", "ddim", "--calib", "4",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "--spacing tuned" in capsys.readouterr().err
    grid = checkpoint.load(out).sampling.grid("ddim", 3)
    assert grid is not None and len(grid) == 3
    assert checkpoint.load(path).sampling.grids == ()  # the source is left as it was


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "steps must be between 1 and 50"),
    (["--steps", "51"], "steps must be between 1 and 50"),
    (["--steps", "4", "--sampler", "euler"], "unknown sampler"),
    (["--steps", "4", "--sampler", "ddpm"], "draws fresh noise"),
    (["--steps", "4", "--calib", "0"], "calib must be positive"),
])
def test_tune_steps_bad_input_is_one_line_and_leaves_the_file(tmp_path, capsys, args, message):
    path = save_tiny(tmp_path / "m.pt")
    before = path.read_bytes()
    assert main(["tune-steps", str(path), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert path.read_bytes() == before


def test_the_bundled_model_ships_the_default_grid():
    """`fastddpm sample` with no options runs the default sampler on the asset's tuned grid."""
    model = checkpoint.load("default")
    steps = FAST_STEPS[DEFAULT_SAMPLER]
    grid = model.sampling.grid(DEFAULT_SAMPLER, steps)
    assert grid is not None and grid[0] == model.schedule.num_timesteps - 1
    assert model.plan(SamplingOptions()) == (steps, grid)
