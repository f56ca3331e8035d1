"""Prediction types (ε, x0, v): the table transform against closed forms, and DDPM / DDIM chains
against diffusers' own schedulers, step by step from the same x_T, for each type."""
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm
from diffusers_chains import chain_noise, our_chain, their_chain
from diffusers_tables import with_float64_tables
from interop_models import perturbed_unet, use_our_timestep_embedding

import fastddpm
from fastddpm.kernels import reverse_step_reference
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.prediction import PREDICTIONS, epsilon_denoiser, for_prediction
from fastddpm.samplers import COEF_FIELDS
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import UNetConfig

TINY = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), dropout=0.0, groups=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: hundreds of tiny ops


def _model(prediction: str, schedule=ScheduleConfig()) -> DiffusionModel:
    return DiffusionModel.create(TINY, schedule, SamplingDefaults("fixed_small", False, prediction))


def _output(prediction, x0, eps, ac):
    """What a perfect network of each type outputs for (x0, ε) at ᾱ."""
    return {"epsilon": eps, "sample": x0, "v_prediction": ac.sqrt() * eps - (1 - ac).sqrt() * x0}[prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_every_type_takes_the_same_step_from_the_same_truth(prediction, sampler):
    """Fed the output a perfect network of its type gives, every row of the converted table
    yields the x̂0 and x_prev of the ε table fed the true ε (float64, no clipping)."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), \
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ours, reference = _model(prediction), _model("epsilon")
    table, eps_table = ours.table(sampler=sampler, steps=10), reference.table(sampler=sampler, steps=10)
    if prediction != "epsilon":
        assert not torch.equal(table.coef, eps_table.coef)
    for i, t in enumerate(table.timesteps.tolist()):
        ac = ours.schedule.alphas_cumprod[t]
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
        got = reverse_step_reference(x_t, _output(prediction, x0, eps, ac), table.coef[i], z)
        want = reverse_step_reference(x_t, eps, eps_table.coef[i], z)
        torch.testing.assert_close(got[1], x0, rtol=1e-9, atol=1e-9)  # x̂0 is the truth
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_raw_eps_term_is_converted_too(prediction):
    """A table that also weighs the model's raw ε (c ≠ 0): c·ε of the true noise, whatever the
    network predicts."""
    g = torch.Generator().manual_seed(2)
    model = _model("epsilon")
    table = model.table(sampler="ddim", steps=5)
    coef = table.coef.clone()
    coef[:, COEF_FIELDS.index("c")] = torch.rand(len(coef), generator=g, dtype=torch.float64) + 0.5
    eps_table = dataclasses.replace(table, coef=coef)
    converted = for_prediction(eps_table, prediction)
    x0 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 6, generator=g, dtype=torch.float64)
    for i, t in enumerate(table.timesteps.tolist()):
        ac = model.schedule.alphas_cumprod[t]
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
        got = reverse_step_reference(x_t, _output(prediction, x0, eps, ac), converted.coef[i])[0]
        want = reverse_step_reference(x_t, eps, eps_table.coef[i])[0]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_likelihood_sees_the_eps_a_prediction_implies(prediction):
    model = _model(prediction, ScheduleConfig("cosine", 200))
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), \
        torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 120, 199])
    ac = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    perfect = lambda x, t: _output(prediction, x0, eps, ac)  # noqa: E731
    got, w = epsilon_denoiser(perfect, model.schedule.alphas_cumprod, prediction)(x_t, t)
    assert w is None  # a fixed variance: no variance channels
    torch.testing.assert_close(got, eps, rtol=1e-9, atol=1e-9)


# ---- chains against diffusers' schedulers ------------------------------------------------------

# diffusers' defaults at toy size: flipped embedding, freq_shift 0, symmetric padding, 8-channel heads
CONFIG = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
          "block_out_channels": (16, 32, 32), "norm_num_groups": 8,
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
STEPS, BATCH, SEED = 8, 2, 5


class _NoiseFeed:
    """Stands in for diffusers' randn_tensor: hands out our step noise, in order."""

    def __init__(self, noise):
        self.queue = list(noise)

    def __call__(self, shape, *args, dtype=None, **kwargs):
        return self.queue.pop(0).to(dtype)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler,settings", [
    ("ddpm", {"variance_type": "fixed_small", "clip_sample": False}),
    ("ddpm", {"variance_type": "fixed_large", "clip_sample": True}),
    ("ddim", {"clip_sample": False, "eta": 0.0}),
    ("ddim", {"clip_sample": True, "eta": 0.5}),
], ids=["ddpm-small", "ddpm-large-clip", "ddim", "ddim-eta-clip"])
def test_chain_matches_diffusers_scheduler(prediction, sampler, settings, tmp_path, monkeypatch):
    """Our table and reverse step against diffusers' step(), in float64 on both sides (a
    random-weight U-Net amplifies any rounding along the chain), from one x_T with one noise."""
    use_our_timestep_embedding(monkeypatch)
    settings = dict(settings)
    eta = settings.pop("eta", None)
    cls, module = (DDPMScheduler, scheduling_ddpm) if sampler == "ddpm" else (DDIMScheduler, scheduling_ddim)
    unet = perturbed_unet(CONFIG, seed=11)
    unet.save_pretrained(tmp_path)
    cls(prediction_type=prediction, **settings).save_pretrained(tmp_path)
    model = fastddpm.load(tmp_path)
    assert model.sampling.prediction == prediction
    table = model.table(sampler=sampler, steps=STEPS, spacing="leading",
                        **({"eta": eta} if sampler == "ddim" else {}))

    x_T, noise = chain_noise(SEED, BATCH, STEPS, (3, 8, 8))
    ours = our_chain(model, table, x_T, noise)

    scheduler = with_float64_tables(cls.from_pretrained(tmp_path), model.schedule)
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == table.timesteps.tolist()
    monkeypatch.setattr(module, "randn_tensor", _NoiseFeed(noise))
    extra = {"eta": eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
    theirs = their_chain(scheduler, unet, x_T, **extra)

    # a chain that moved (unclipped, a random ε-network's x̂0 runs to ±100s: absolute 1e-4 there
    # is a relative 1e-6)
    assert 0.05 < theirs.std() and bool(torch.isfinite(theirs).all())
    assert (ours - theirs).abs().max().item() <= 1e-4
