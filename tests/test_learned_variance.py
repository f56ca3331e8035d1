"""Learned variances (improved DDPM; out_channels = 2 × in_channels): diffusers' "learned" and
"learned_range" against its own DDPMScheduler — table rows on a stand-in network, whole chains of
a random-weight UNet2DModel from the same x_T with the same noise — the runtime against a
hand-written loop, the other samplers on the prediction channels only (as diffusers' DPM-Solver),
the round trip through a diffusers folder, what is refused, and bits/dim (improved DDPM's L_vlb)
against the bound written out in float64."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers_chains import chain_noise, our_chain, their_chain
from diffusers_tables import with_float64_sigmas, with_float64_tables
from interop_models import perturbed_unet, use_our_timestep_embedding
from learned_models import learned_model, positive_variance, reference_loop
from test_likelihood import _grid_images, _log_bin_mass
from tiny import tiny_config

import fastddpm
from fastddpm import checkpoint, likelihood
from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.images import to_uint8
from fastddpm.interop import save_folder
from fastddpm.kernels import reverse_step_reference
from fastddpm.kernels.noise import FORWARD_STREAM, INIT_STREAM, STEP_STREAM, gaussian
from fastddpm.likelihood import bits_per_dim
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.samplers import ddpm_table, dpmpp_2m_table
from fastddpm.schedule import Schedule, ScheduleConfig
from fastddpm.variance import LEARNED, split_output

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: hundreds of tiny ops

T = 1000
SCHEDULE = Schedule(ScheduleConfig("linear", T))
SHAPE = (2, 3, 4, 4)


def _stand_in(x: torch.Tensor, t: int, variance: str) -> torch.Tensor:
    """A network of 2C channels, smooth in (x, t): ε, then v — positive for "learned" (diffusers
    takes its square root), in (−1, 1) for "learned_range"."""
    eps = torch.tanh(0.9 * x + t / T) + 0.05 * torch.sin(3.0 * x)
    v = torch.tanh(1.3 * x - t / T)
    return torch.cat([eps, 0.02 * (1.5 + v) if variance == "learned" else v], dim=1)


def _noises(n: int, seed: int, shape=SHAPE) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("variance", LEARNED)
@pytest.mark.parametrize("spacing,steps", [("leading", 1000), ("leading", 20), ("trailing", 13),
                                           ("linspace", 7)])
def test_ddpm_steps_match_diffusers(variance, spacing, steps, monkeypatch):
    """Row by row against DDPMScheduler.step on a stand-in network, float64 on both sides:
    σ from the strided steps' own β and β̃ (diffusers' prev_t), and no noise after the last step
    (diffusers adds some where that step's t > 0, 'trailing': zeroed there, as test_samplers)."""
    table = ddpm_table(SCHEDULE, steps, spacing, variance=variance, clip=True)
    sched = with_float64_tables(DDPMScheduler(num_train_timesteps=T, variance_type=variance,
                                              timestep_spacing=spacing), SCHEDULE)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == table.timesteps.tolist()
    n = min(steps, 40)  # a full 1000-step chain: its first 40 steps
    zs = _noises(n, seed=steps)
    queue = list(zs)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: queue.pop(0))
    x = xd = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i, t in enumerate(table.timesteps[:n].tolist()):
        eps, w = split_output(_stand_in(x, t, variance), 3, table.learned_variance)
        x, _ = reverse_step_reference(x, eps, table.coef[i], zs[i], None, True, w)
        if i == steps - 1:
            queue = [torch.zeros(SHAPE, dtype=torch.float64)]
        xd = sched.step(_stand_in(xd, t, variance), t, xd).prev_sample
        assert not torch.isnan(x).any()
        rel = ((x - xd).abs().max() / xd.abs().max()).item()
        assert rel <= 1e-6, f"step {i}: relative error {rel:.3g}"


def test_dpm_solver_uses_the_prediction_channels_only():
    """diffusers' DPM-Solver++ with a learned variance steps on the first channels of the output
    (its convert_model_output); so does ours."""
    table = dpmpp_2m_table(SCHEDULE, 10, "trailing", clip=False)
    sched = with_float64_sigmas(DPMSolverMultistepScheduler(
        num_train_timesteps=T, variance_type="learned_range", algorithm_type="dpmsolver++",
        lower_order_final=True, final_sigmas_type="zero"), SCHEDULE, table.timesteps.tolist())
    x = xd = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    history = []
    for i, t in enumerate(table.timesteps.tolist()):
        eps, w = split_output(_stand_in(x, t, "learned_range"), 3, table.learned_variance)
        assert w is None and eps.shape == x.shape
        x, x0 = reverse_step_reference(x, eps, table.coef[i], None, history)
        history = [x0, *history][:table.history]
        xd = sched.step(_stand_in(xd, t, "learned_range"), t, xd).prev_sample
        rel = ((x - xd).abs().max() / xd.abs().max()).item()
        assert rel <= 1e-6, f"step {i}: relative error {rel:.3g}"


# ---- a random-weight UNet2DModel, whole chains ------------------------------------------------

CONFIG = {"sample_size": 8, "in_channels": 3, "out_channels": 6, "layers_per_block": 1,
          "block_out_channels": (16, 32, 32), "norm_num_groups": 8,
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
BATCH, SEED = 2, 5


def _learned_unet(variance: str, seed: int = 11):
    """perturbed_unet with 2C outputs (positive variance channels under "learned")."""
    unet = perturbed_unet(CONFIG, seed=seed)
    if variance == "learned":
        positive_variance(unet.conv_out, 3)
    return unet


@pytest.mark.parametrize("variance,prediction", [
    ("learned", "epsilon"), ("learned", "v_prediction"),
    ("learned_range", "epsilon"), ("learned_range", "v_prediction"), ("learned_range", "sample")])
@pytest.mark.parametrize("train_steps,steps", [(1000, 8), (12, 12)], ids=["strided", "every-step"])
def test_chain_matches_diffusers_ddpm_loop(variance, prediction, train_steps, steps, tmp_path,
                                           monkeypatch):
    """The loaded folder's table, split and reverse step against diffusers' own DDPMScheduler loop
    on the same UNet2DModel, float64 on both sides, one x_T and one noise (handed to diffusers
    for its randn_tensor), ≤ 1e-4 at the end of the chain."""
    use_our_timestep_embedding(monkeypatch)
    unet = _learned_unet(variance)
    unet.save_pretrained(tmp_path)
    DDPMScheduler(num_train_timesteps=train_steps, variance_type=variance, prediction_type=prediction,
                  clip_sample=False).save_pretrained(tmp_path)
    model = fastddpm.load(tmp_path)
    assert (model.sampling.variance, model.config.out_channels) == (variance, 6)
    table = model.table(sampler="ddpm", steps=steps, spacing="leading")

    x_T, noise = chain_noise(SEED, BATCH, steps, (3, 8, 8))
    with torch.no_grad():
        assert model.unet(x_T.float(), torch.tensor([0, 5])).shape == (BATCH, 6, 8, 8)
    ours = our_chain(model, table, x_T, noise)

    scheduler = with_float64_tables(DDPMScheduler.from_pretrained(tmp_path), model.schedule)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == table.timesteps.tolist()
    queue = list(noise)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, dtype=None, **k: queue.pop(0).to(dtype))
    theirs = their_chain(scheduler, unet, x_T)
    assert len(queue) == 1  # a z per step but the last (t = 0: none)

    assert 0.05 < theirs.std() and bool(torch.isfinite(theirs).all())
    assert (ours - theirs).abs().max().item() <= 1e-4


# ---- the runtime -----------------------------------------------------------------------------

@pytest.mark.parametrize("variance,sampler", [("learned", "ddpm"), ("learned_range", "ddpm"),
                                              ("learned_range", "ddim"), ("learned_range", "dpm++")])
def test_runtime_equals_hand_written_loop(variance, sampler):
    """fastddpm.sample (the Sampler's split, the kernel dispatch) against the reference fed the
    network's halves by hand, on the same noise: DDPM reads w, the other samplers only the
    prediction."""
    model = learned_model(variance, "v_prediction")
    steps, seed, num = 10, 21, 3
    eta = 0.5 if sampler == "ddim" else None
    table = model.table(sampler=sampler, steps=steps, eta=eta)
    index = torch.arange(num)
    noise = torch.stack([gaussian(seed, index, 0, (2, 8, 8), INIT_STREAM)]
                        + [gaussian(seed, index, i, (2, 8, 8), STEP_STREAM) for i in range(steps)])
    want = reference_loop(model, table, noise, read_w=sampler == "ddpm")
    got = fastddpm.sample(model, num=num, steps=steps, sampler=sampler, eta=eta, seed=seed, device="cpu",
                          dtype="fp32")
    assert got.shape == (num, 2, 8, 8) and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    if sampler == "ddpm":  # w mattered: σ_row alone ends elsewhere
        assert (reference_loop(model, table, noise, read_w=False) - want).abs().max() > 1e-2


# ---- files and refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("variance", LEARNED)
def test_round_trips_are_bit_exact(variance, tmp_path):
    """Through a diffusers folder (`convert --to diffusers` writes variance_type back, and
    diffusers reads it) and through a model file."""
    model = learned_model(variance)
    save_folder(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "scheduler_config.json").read_text())
    assert written["variance_type"] == variance
    assert DDPMScheduler.from_pretrained(tmp_path / "out").config.variance_type == variance
    checkpoint.save(model, tmp_path / "m.pt")
    for back in (fastddpm.load(tmp_path / "out"), fastddpm.load(tmp_path / "m.pt")):
        assert back.config == model.config and back.sampling == model.sampling
        ours, theirs = model.unet.state_dict(), back.unet.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_cli_converts_then_samples_the_same_images(tmp_path, capsys):
    """`convert --to diffusers`, then `sample` from that folder: the images of sampling the model
    in-process, same seed, same noise."""
    model = learned_model("learned_range")
    checkpoint.save(model, tmp_path / "m.pt")
    assert main(["convert", str(tmp_path / "m.pt"), "--to", "diffusers", "-o", str(tmp_path / "hub")]) == 0
    code = main(["sample", "--model", str(tmp_path / "hub"), "--num", "2", "--steps", "4", "--sampler",
                 "ddpm", "--out", str(tmp_path / "x.npz"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    direct = to_uint8(fastddpm.sample(model, num=2, steps=4, sampler="ddpm"))
    assert np.array_equal(next(iter(np.load(tmp_path / "x.npz").values())), direct)


def test_channels_that_do_not_fit_the_variance_are_one_line():
    two = dataclasses.replace(tiny_config(2), out_channels=4)
    for config, variance, message in [
            (two, "fixed_small", r"variance_type 'fixed_small' needs out_channels = in_channels \(2\)"),
            (tiny_config(2), "learned",
             r"variance_type 'learned' needs out_channels = 2 × in_channels \(4\)")]:
        with pytest.raises(UserError, match=message) as info:
            DiffusionModel.create(config, sampling=SamplingDefaults(variance))
        assert "\n" not in str(info.value)


# ---- bits/dim ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", LEARNED)
def test_bits_per_dim_uses_the_learned_variance(variance, monkeypatch):
    """Every term of the bound for a stand-in 2C network against improved DDPM's L_vlb written
    out in float64: σ² = v, or log σ² between log β_t and log β̃_t (β̃_2 at the paper's t = 1,
    as its code clips), per element; KL terms by torch.distributions, the decoder by scipy."""
    schedule = ScheduleConfig("linear", 30, 1e-3, 0.2)
    model = DiffusionModel.create(dataclasses.replace(tiny_config(1), out_channels=2), schedule,
                                  SamplingDefaults(variance, clip=True))

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = torch.tanh(1.5 * x_t - 0.2)
        return torch.cat([torch.tanh(0.8 * x_t) + 0.1, 0.01 * (1.2 + v) if variance == "learned" else v], 1)

    monkeypatch.setattr(likelihood, "make_denoiser", lambda *args: net)
    images = _grid_images(2, seed=4)
    bound = bits_per_dim(model, images, seed=5, device="cpu", batch_size=17)

    betas = model.schedule.betas
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    normal = torch.distributions.Normal
    for i, x0 in enumerate(images):
        x0 = x0[None]
        for t in range(len(betas)):
            z = gaussian(5, torch.tensor([i]), torch.tensor([[t]]), (1, 8, 8), FORWARD_STREAM).double()
            x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * z
            out = net(x_t.float(), torch.tensor([t])).double()
            eps, v = out[:, :1], out[:, 1:]
            x0_hat = ((x_t - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()).clamp(-1, 1)
            c1 = betas[t] * ac_prev[t].sqrt() / (1 - ac[t])
            c2 = (1 - ac_prev[t]) * (1 - betas[t]).sqrt() / (1 - ac[t])
            if variance == "learned":
                logvar = v.log()
            else:
                frac = (v + 1) / 2
                logvar = frac * betas[t].log() + (1 - frac) * post_var[max(t, 1)].log()
            mean_p, std_p = c1 * x0_hat + c2 * x_t, (0.5 * logvar).exp()
            if t == 0:
                want = -_log_bin_mass(x0.numpy(), mean_p.numpy(), std_p.numpy()).mean() / math.log(2)
            else:
                q = normal(c1 * x0 + c2 * x_t, post_var[t].sqrt())
                want = torch.distributions.kl_divergence(q, normal(mean_p, std_p)).mean() / math.log(2)
            assert bound.terms[i, t].item() == pytest.approx(float(want), rel=1e-8, abs=1e-12), (i, t)
    assert torch.isfinite(bound.total).all()
