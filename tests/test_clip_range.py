"""A clip range r ≠ 1 (diffusers' clip_sample_range, samplers.with_clip_range): every sampler's
table, run by the kernel's reference over x̂0/r, against a float64 chain that clips x̂0 to
[−r, r] itself; the runtime's progressive x̂0 and the step graph's x0 output are x̂0 itself.
diffusers' DDPM and DDIM loops with clip_sample_range: test_hub_schedulers. diffusers' multistep
schedulers have no clip_sample setting at all; ours clip there as the model says, as they do at r = 1."""
from dataclasses import replace

import pytest
import torch
from diffusers_chains import chain_noise
from tiny import TINY, tiny_model

from fastddpm import tuning
from fastddpm.export.onnx import OnnxOptions, export_onnx
from fastddpm.export.runners import OrtRunner
from fastddpm.export.step_loop import sample_with_step_graph
from fastddpm.kernels import reverse_step_reference
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.options import SamplingOptions
from fastddpm.runtime import Sampler
from fastddpm.samplers import COEF_FIELDS, SAMPLERS
from fastddpm.schedule import Schedule, ScheduleConfig

SCHEDULE = Schedule(ScheduleConfig("linear", 100))
STEPS, SHAPE = 6, (2, 1, 4, 4)
CASES = [(s, p, None) for s in SAMPLERS for p in ("epsilon", "v_prediction", "sample")
         if p == "epsilon" or not s.startswith("ipndm")]  # ε-history tables run ε models only
CASES += [("ddpm", "epsilon", "learned_range"), ("ddpm", "v_prediction", "learned")]


def _model(r: float, prediction: str, variance: str | None) -> DiffusionModel:
    """A model object for its tables only (the network is never run here)."""
    channels = 2 if variance else 1
    sampling = SamplingDefaults(variance or "fixed_large", True, prediction, clip_range=r)
    return DiffusionModel.create(replace(TINY, out_channels=channels), SCHEDULE.config, sampling)


def _network(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for the network: an output of magnitude up to 3 (so x̂0 passes ±0.5 and ±2.5
    for every prediction type) and a learned variance's w."""
    return 3.0 * torch.sin(2.0 * x + t / 30.0), 0.3 * torch.cos(x)


def _reference_step(row, x, m, z, past, r, w, eps_history):
    """One step of the samplers.py update with x̂0 clipped to [−r, r], written out in float64."""
    c_x, c_e, a, b, c, *d, slope, sigma = row.tolist()
    mixed = sum((d_k * old for d_k, old in zip(d, past, strict=False)), torch.zeros_like(x))
    e = m + mixed if eps_history else m
    x0 = (c_x * x - c_e * e).clamp(-r, r)
    sigma = sigma * torch.exp(slope * w) if sigma else 0.0
    return a * x0 + b * x + c * e + (0.0 if eps_history else mixed) + sigma * z, x0


@pytest.mark.parametrize("r", [0.5, 2.5])
@pytest.mark.parametrize("sampler,prediction,variance", CASES)
def test_every_table_clips_at_r(sampler, prediction, variance, r):
    options = {"sampler": sampler, "steps": STEPS, "spacing": "trailing",
               "eta": 0.5 if sampler == "ddim" else None}
    table = _model(r, prediction, variance).table(**options)
    plain = _model(1.0, prediction, variance).table(**options)  # the same table, clipped at ±1
    assert table.x0_scale == r and plain.x0_scale == 1.0
    kept = [COEF_FIELDS.index(name) for name in ("b", "c", "sigma_slope", "sigma")]
    assert torch.equal(table.coef[:, kept], plain.coef[:, kept])
    eps_history = table.history_kind == "eps"
    gen = torch.Generator().manual_seed(3)
    x = ours = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    ring, past, clipped = [], [], False
    for i, t in enumerate(table.timesteps.tolist()):
        z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        m, w = _network(x, t)
        x_next, x0 = _reference_step(plain.coef[i], x, m, z, past, r, w, eps_history)
        m, w = _network(ours, t)
        ours, kernel_x0 = reverse_step_reference(ours, m, table.coef[i], z, ring, clip=True,
                                                 variance=w if variance else None,
                                                 eps_history=eps_history)
        torch.testing.assert_close(kernel_x0 * table.x0_scale, x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, x_next, rtol=1e-12, atol=1e-12)
        clipped |= bool((x0.abs() == r).any())
        ring = [m if eps_history else kernel_x0, *ring][:table.history]
        past = [m if eps_history else x0, *past][:table.history]
        x = x_next
    assert clipped  # the range mattered


@pytest.fixture(scope="module")
def clipped_model():
    return tiny_model(sampling=SamplingDefaults(clip_range=0.5), seed=4)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ipndm"])  # no ring, x̂0 ring, ε ring
def test_progressive_x0_is_x0_clipped_at_r(clipped_model, sampler):
    runner = Sampler(clipped_model, sampler=sampler, steps=5, spacing="trailing", device="cpu")
    assert runner.table.x0_scale == 0.5
    x0s = []
    final = runner.run(seed=1, first=0, batch=2, on_step=lambda i, x0: x0s.append(x0.clone()))
    torch.testing.assert_close(x0s[-1], final)  # the last step (to ᾱ = 1) returns its x̂0
    assert max(x0.abs().max().item() for x0 in x0s) == pytest.approx(0.5, abs=1e-6)


def test_step_graph_x0_output_and_ring_are_x0(clipped_model, tmp_path):
    """The exported step graph's x0 output is x̂0 (not x̂0/r), which the host writes into the
    ring; the graph scales the ring back for its table, so its chain is the runtime's."""
    sampling = SamplingOptions(sampler="dpm++", steps=5, spacing="trailing")
    export_onnx(clipped_model, tmp_path / "step.onnx", OnnxOptions(what="step", sampling=sampling,
                                                                   opset=18), log=None)
    graph = OrtRunner(tmp_path / "step.onnx")
    runner = Sampler(clipped_model, sampling, device="cpu", dtype="fp32")
    assert runner.table.history > 0 and runner.table.history_kind == "x0"
    x0s = []

    def run(**inputs):
        out = graph(**inputs)
        x0s.append(out["x0"].clone())
        return out

    x_T, noise = chain_noise(1, 2, runner.table.num_steps, (1, 8, 8))
    x = sample_with_step_graph(run, torch.stack([x_T, *noise]).float(), runner.table.history)
    seen = []
    final = runner.run(seed=1, first=0, batch=2, on_step=lambda i, x0: seen.append(x0.clone()))
    torch.testing.assert_close(x, final, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(x0s, seen, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_tuning_reference_keeps_x0(clipped_model):
    """tune-steps weighs the reference's x̂0 with DDIM rows of its own (unscaled) tables."""
    ref = tuning._reference(clipped_model, SamplingOptions(device="cpu"), 6, 2, 0)
    assert ref.x0.abs().max().item() == pytest.approx(0.5, abs=1e-6)
