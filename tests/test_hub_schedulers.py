"""The Hub's scheduler settings (issue 15): DDIM's set_alpha_to_one=False, zero terminal SNR
(rescale_betas_zero_snr), the leading grid's steps_offset and clip_sample_range, each against diffusers' own
scheduler loop on a random-weight UNet2DModel — float64 on both sides, one x_T and one noise
(handed to diffusers for its randn_tensor), ≤ 1e-4 at the end of the chain — then what is
refused, and the round trips through a diffusers folder and a model file."""
import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm
from diffusers_chains import chain_noise, our_chain, their_chain
from diffusers_tables import with_float64_sigmas, with_float64_tables
from interop_models import perturbed_unet, use_our_timestep_embedding

import fastddpm
from fastddpm import checkpoint
from fastddpm.errors import UserError
from fastddpm.interop import save_folder
from fastddpm.likelihood import bits_per_dim
from fastddpm.model import SamplingDefaults

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: hundreds of tiny ops

CONFIG = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
          "block_out_channels": (16, 32, 32), "norm_num_groups": 8,
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
BATCH, SEED, STEPS = 2, 5, 8
# β from 0.01: ᾱ_0 = 0.99, so DDIM's last step to ᾱ_0 ends measurably apart from one to ᾱ = 1
BETAS = {"beta_start": 0.01, "beta_end": 0.02}


def _folder(tmp_path, scheduler) -> tuple[UNet2DModel, fastddpm.DiffusionModel]:
    """A random UNet2DModel beside `scheduler`'s config, and the model fastddpm loads from them."""
    unet = perturbed_unet(CONFIG, seed=11)
    unet.save_pretrained(tmp_path)
    scheduler.save_pretrained(tmp_path)
    return unet, fastddpm.load(tmp_path)


def _chains(model, unet, table, scheduler, monkeypatch, module=None, last_noise=True, x0s=None,
            **step_options):
    """Ours and diffusers' chain from one x_T; `module`'s randn_tensor handed our noise, none
    after the last step unless `last_noise` (diffusers' DDPM adds some where that step's t > 0;
    Algorithm 2 and our tables never do, so it is zeroed there, as test_samplers does); our
    kernel's x̂0 of each step into `x0s` if given (diffusers_chains.our_chain)."""
    use_our_timestep_embedding(monkeypatch)
    x_T, noise = chain_noise(SEED, BATCH, table.num_steps, (3, 8, 8))
    ours = our_chain(model, table, x_T, noise, x0s)
    queue = list(noise) if last_noise else [*noise[:-1], torch.zeros_like(noise[-1])]
    if module is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, dtype=None, **k: queue.pop(0).to(dtype))
    theirs = their_chain(scheduler, unet, x_T, **step_options)
    assert 0.05 < theirs.std() and bool(torch.isfinite(theirs).all())
    return ours, theirs


def _diffusers_loop(scheduler, model, steps=STEPS):
    scheduler = with_float64_tables(scheduler, model.schedule)
    scheduler.set_timesteps(steps)
    return scheduler


# ---- set_alpha_to_one=False: DDIM's last step goes to ᾱ_0 ----------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_ending_at_alpha_0_matches_diffusers(prediction, eta, tmp_path, monkeypatch):
    unet, model = _folder(tmp_path, DDIMScheduler(set_alpha_to_one=False, prediction_type=prediction,
                                                  clip_sample=False, **BETAS))
    assert not model.sampling.set_alpha_to_one
    table = model.table(sampler="ddim", steps=STEPS, spacing="leading", eta=eta)
    scheduler = _diffusers_loop(DDIMScheduler.from_pretrained(tmp_path), model)
    assert scheduler.timesteps.tolist() == table.timesteps.tolist()
    ours, theirs = _chains(model, unet, table, scheduler, monkeypatch, scheduling_ddim, eta=eta)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # the setting mattered: ending at ᾱ = 1 lands elsewhere
    to_one = SamplingDefaults("fixed_small", False, prediction)
    other = fastddpm.DiffusionModel(model.unet, model.schedule, to_one).table(
        sampler="ddim", steps=STEPS, spacing="leading", eta=eta)
    x_T, noise = chain_noise(SEED, BATCH, STEPS, (3, 8, 8))
    assert (our_chain(model, other, x_T, noise) - ours).abs().max().item() > 1e-2


def test_only_ddim_reads_set_alpha_to_one(tmp_path):
    """diffusers' other schedulers have no such key and end at ᾱ = 1; so do ours."""
    _, model = _folder(tmp_path, DDIMScheduler(set_alpha_to_one=False, clip_sample=False, **BETAS))
    plain = fastddpm.DiffusionModel(model.unet, model.schedule, SamplingDefaults("fixed_small", False))
    for sampler in ("ddpm", "dpm++", "unipc", "ipndm"):
        ours, theirs = (m.table(sampler=sampler, steps=STEPS, spacing="trailing") for m in (model, plain))
        assert torch.equal(ours.coef, theirs.coef), sampler
    ours, theirs = (m.table(sampler="ddim", steps=STEPS, spacing="trailing") for m in (model, plain))
    assert torch.equal(ours.coef[:-1], theirs.coef[:-1]) and not torch.equal(ours.coef[-1], theirs.coef[-1])


# ---- rescale_betas_zero_snr: ᾱ_T = 0 --------------------------------------------------------

@pytest.mark.parametrize("sampler,prediction,spacing", [
    ("ddpm", "v_prediction", "trailing"), ("ddpm", "sample", "trailing"), ("ddpm", "v_prediction", "leading"),
    ("ddpm", "epsilon", "leading"),  # leading never visits t = T, where ε's x̂0 is undefined
    ("ddim", "v_prediction", "trailing"), ("ddim", "sample", "trailing"), ("ddim", "epsilon", "leading")])
def test_zero_terminal_snr_matches_diffusers(sampler, prediction, spacing, tmp_path, monkeypatch):
    kind = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    unet, model = _folder(tmp_path, kind(rescale_betas_zero_snr=True, prediction_type=prediction,
                                         timestep_spacing=spacing, clip_sample=False))
    assert model.schedule.config.kind == "custom" and model.schedule.alphas_cumprod[-1] == 0
    table = model.table(sampler=sampler, steps=STEPS, spacing=spacing)
    assert bool(torch.isfinite(table.coef).all())
    assert (table.timesteps[0] == 999) == (spacing == "trailing")
    scheduler = _diffusers_loop(kind.from_pretrained(tmp_path), model)
    assert scheduler.timesteps.tolist() == table.timesteps.tolist()
    module = scheduling_ddpm if sampler == "ddpm" else None
    ours, theirs = _chains(model, unet, table, scheduler, monkeypatch, module,
                           last_noise=spacing == "leading")
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", ["dpm++", "unipc"])
def test_zero_terminal_snr_multistep_matches_diffusers(sampler, prediction, tmp_path, monkeypatch):
    """diffusers' multistep schedulers step from ᾱ = 2^-24 at t = T when rescaling, for every
    prediction type (ε's x̂0 is then defined, if 4096× large); so do ours. Their step() casts the
    sample to float32, so the chains agree to float32's relative 1e-6 (as test_samplers holds
    them), which at ε's magnitudes here (~5e3) is above 1e-4 absolute."""
    unet, model = _folder(tmp_path, DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction,
                                                  clip_sample=False))  # as diffusers' solvers
    table = model.table(sampler=sampler, steps=STEPS, spacing="trailing")
    assert table.timesteps[0] == 999 and table.alphas_cumprod[0] == 2.0**-24
    kind = DPMSolverMultistepScheduler if sampler == "dpm++" else UniPCMultistepScheduler
    scheduler = with_float64_sigmas(kind(rescale_betas_zero_snr=True, prediction_type=prediction,
                                         timestep_spacing="trailing"),
                                    model.schedule, table.timesteps.tolist())
    assert scheduler.alphas_cumprod[-1] == 2.0**-24
    ours, theirs = _chains(model, unet, table, scheduler, monkeypatch)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-6


def _one_line(call, message: str) -> str:
    with pytest.raises(UserError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_zero_terminal_snr_refusals(tmp_path):
    _, model = _folder(tmp_path, DDPMScheduler(rescale_betas_zero_snr=True))  # ε-prediction
    for sampler in ("ddpm", "ddim", "ipndm"):  # each steps from ᾱ_T = 0 itself
        _one_line(lambda s=sampler: model.table(sampler=s, steps=STEPS, spacing="trailing"),
                  "ᾱ = 0 at t = 999 .*rescale_betas_zero_snr.*ε-prediction")
    _one_line(lambda: model.table(sampler="unipc", steps=STEPS, spacing="logsnr"),
              "logsnr spacing needs ᾱ > 0 .*rescale_betas_zero_snr")
    _one_line(lambda: bits_per_dim(model, torch.zeros(1, 3, 8, 8), device="cpu"),
              "bits/dim needs ᾱ > 0 .*rescale_betas_zero_snr")


# ---- steps_offset: the leading grid shifted --------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_steps_offset_matches_diffusers(sampler, prediction, tmp_path, monkeypatch):
    kind = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    unet, model = _folder(tmp_path, kind(steps_offset=1, prediction_type=prediction, clip_sample=False))
    assert model.sampling.steps_offset == 1
    table = model.table(sampler=sampler, steps=STEPS, spacing="leading")
    assert table.timesteps.tolist() == [876, 751, 626, 501, 376, 251, 126, 1]
    scheduler = _diffusers_loop(kind.from_pretrained(tmp_path), model)
    assert scheduler.timesteps.tolist() == table.timesteps.tolist()
    module = scheduling_ddpm if sampler == "ddpm" else None
    ours, theirs = _chains(model, unet, table, scheduler, monkeypatch, module, last_noise=False)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_steps_offset_shifts_only_the_leading_grid(tmp_path):
    _, model = _folder(tmp_path, DDPMScheduler(steps_offset=3))
    plain = fastddpm.DiffusionModel(model.unet, model.schedule, SamplingDefaults("fixed_small"))
    for sampler in ("dpm++", "unipc"):
        leading, trailing = ([m.table(sampler=sampler, steps=STEPS, spacing=spacing).timesteps
                              for m in (model, plain)] for spacing in ("leading", "trailing"))
        assert torch.equal(leading[0], leading[1] + 3) and torch.equal(trailing[0], trailing[1])
    # an offset the stride T // steps does not exceed: diffusers would end short of x_0 (or past T)
    _one_line(lambda: model.table(sampler="ddim", steps=334, spacing="leading"),
              "steps_offset=3 needs a leading grid whose stride .* 334 steps of 1000 have stride 2")


# ---- clip_sample_range: x̂0 clipped to [−r, r] ---------------------------------------------

# a range below 1 and one above, where x̂0 passes it: this network's x0 prediction stays
# within ±1.4, the x̂0 of its v and ε predictions reach ±2.9 and ±187
@pytest.mark.parametrize("prediction,r", [("epsilon", 0.5), ("epsilon", 2.5), ("v_prediction", 0.5),
                                          ("v_prediction", 2.5), ("sample", 0.5), ("sample", 1.25)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_sample_range_matches_diffusers(sampler, r, prediction, tmp_path, monkeypatch):
    kind = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    unet, model = _folder(tmp_path, kind(clip_sample=True, clip_sample_range=r, prediction_type=prediction))
    assert model.sampling.clip and model.sampling.clip_range == r
    table = model.table(sampler=sampler, steps=STEPS, spacing="leading")
    assert table.x0_scale == r
    scheduler = _diffusers_loop(kind.from_pretrained(tmp_path), model)
    assert scheduler.timesteps.tolist() == table.timesteps.tolist()
    module = scheduling_ddpm if sampler == "ddpm" else None
    # our DDIM's direction is the clipped x̂0's (ddim_table): diffusers' use_clipped_model_output
    options = {"use_clipped_model_output": True} if sampler == "ddim" else {}
    x0s = []
    ours, theirs = _chains(model, unet, table, scheduler, monkeypatch, module, x0s=x0s, **options)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # the range mattered: some x̂0 went past ±r (the kernel's x̂0/r clipped at ±1)
    assert any(bool((x0.abs() == 1.0).any()) for x0 in x0s)


# ---- round trips and what a diffusers folder cannot hold --------------------------------------

@pytest.mark.parametrize("scheduler,written", [
    (DDIMScheduler(set_alpha_to_one=False, **BETAS), "DDIMScheduler"),
    (DDPMScheduler(steps_offset=1, prediction_type="v_prediction"), "DDPMScheduler"),
    (DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                   beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012), "DDPMScheduler"),
    (DDIMScheduler(rescale_betas_zero_snr=True, set_alpha_to_one=False, steps_offset=1,
                   prediction_type="sample"), "DDIMScheduler"),
    (DDPMScheduler(clip_sample_range=2.5, prediction_type="v_prediction"), "DDPMScheduler"),
    (DDIMScheduler(clip_sample_range=0.5, set_alpha_to_one=False, **BETAS), "DDIMScheduler"),
])
def test_to_diffusers_and_back_keeps_the_tables(scheduler, written, tmp_path):
    _, model = _folder(tmp_path / "in", scheduler)
    save_folder(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "scheduler_config.json").read_text())
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert config["_class_name"] == written and index["scheduler"] == ["diffusers", written]
    back = fastddpm.load(tmp_path / "out")
    assert back.sampling == model.sampling and back.schedule.config == model.schedule.config
    for sampler, spacing in (("ddim", "leading"), ("ddim", "trailing"), ("ddpm", "leading"),
                             ("unipc", "trailing")):
        ours, theirs = (m.table(sampler=sampler, steps=STEPS, spacing=spacing) for m in (model, back))
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.coef, theirs.coef)
    # and diffusers reads the same settings from it
    theirs = type(scheduler).from_pretrained(tmp_path / "out")
    for key in ("set_alpha_to_one", "steps_offset", "rescale_betas_zero_snr", "prediction_type",
                "clip_sample", "clip_sample_range"):
        if key in scheduler.config:
            assert theirs.config[key] == scheduler.config[key], key
    torch.testing.assert_close(theirs.alphas_cumprod, scheduler.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_set_alpha_to_one_beside_another_variance_is_refused_in_one_line(tmp_path):
    _, model = _folder(tmp_path / "in", DDIMScheduler(set_alpha_to_one=False))
    large = fastddpm.DiffusionModel(model.unet, model.schedule,
                                    SamplingDefaults("fixed_large", set_alpha_to_one=False))
    _one_line(lambda: save_folder(large, tmp_path / "out"),
              "set_alpha_to_one=False is a DDIMScheduler setting .* fixed_large")
    assert not (tmp_path / "out").exists()


def test_model_files_keep_the_settings(tmp_path):
    _, model = _folder(tmp_path / "in", DDIMScheduler(rescale_betas_zero_snr=True, set_alpha_to_one=False,
                                                      steps_offset=1, prediction_type="v_prediction",
                                                      clip_sample_range=2.5))
    assert model.sampling.clip_range == 2.5
    for name in ("m.pt", "m.safetensors"):
        checkpoint.save(model, tmp_path / name)
        back = fastddpm.load(tmp_path / name)
        assert back.sampling == model.sampling and back.schedule.config == model.schedule.config
    # at their defaults the fields are not written: files read by older fastddpm stay readable
    assert set(SamplingDefaults().to_dict()) == {"variance", "clip"}
    assert SamplingDefaults.from_dict({"variance": "fixed_large", "clip": True}) == SamplingDefaults()
    for bad, message in (({"steps_offset": -2}, "steps_offset must be an integer ≥ 0"),
                         ({"set_alpha_to_one": 0}, "set_alpha_to_one must be true or false"),
                         ({"clip_range": 0.0}, "clip_range must be a finite number > 0, got 0.0"),
                         ({"clip_range": float("inf")}, "clip_range must be a finite number > 0, got inf"),
                         ({"clip_range": True}, "clip_range must be a finite number > 0, got True")):
        _one_line(lambda b=bad: SamplingDefaults.from_dict({"variance": "fixed_large", "clip": True, **b}),
                  message)
