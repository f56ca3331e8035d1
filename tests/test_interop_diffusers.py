"""diffusers folders → our models: same ε to 1e-5, same samples as DDPMPipeline / DDIMPipeline,
and our models → diffusers folders that diffusers loads, losslessly."""
import copy
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from diffusers.models import embeddings
from diffusers.pipelines.ddim import pipeline_ddim
from diffusers.pipelines.ddpm import pipeline_ddpm
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm
from diffusers_tables import with_float64_tables
from interop_models import CIFAR10_CONFIG, DDPM_256_CONFIG, narrow, random_unet

import fastddpm
from fastddpm.interop import save_folder
from fastddpm.kernels import reverse_step_reference
from fastddpm.kernels.noise import INIT_STREAM, STEP_STREAM, gaussian
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import CONFIGS, UNetConfig, timestep_embedding

SMALL_CIFAR = narrow(CIFAR10_CONFIG, (16, 32, 32, 32))  # the CIFAR-10 U-Net at 1/64 the work
# for the 20-step runs, also at a quarter of the pixels (attention then sits at 8², the same level)
SMALL_CIFAR_16 = {**SMALL_CIFAR, "sample_size": 16}


def _flat_folder(path, unet, scheduler):
    """The google/ddpm-* repository layout: everything side by side in one folder."""
    unet.save_pretrained(path)
    scheduler.save_pretrained(path)
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", "UNet2DModel"]}))
    return path


def _max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    unet = random_unet(CIFAR10_CONFIG)
    folder = _flat_folder(tmp_path_factory.mktemp("ddpm-cifar10-32"), unet,
                          DDPMScheduler(variance_type="fixed_large", clip_sample=True))
    return unet, folder


def test_cifar10_config_is_the_papers_model(cifar10):
    model = fastddpm.load(cifar10[1])
    assert model.config == CONFIGS["cifar10"]
    assert model.schedule.config == ScheduleConfig("linear", 1000, 1e-4, 0.02)
    assert model.sampling == SamplingDefaults("fixed_large", clip=True)
    assert sum(p.numel() for p in model.unet.parameters()) == 35_746_307


def test_cifar10_forward_matches_diffusers(cifar10):
    unet, folder = cifar10
    model = fastddpm.load(folder)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    t = torch.tensor([17, 803])
    with torch.no_grad():
        ours, theirs = model.unet(x, t), unet(x, t).sample
    assert theirs.abs().max() > 0.1  # a real signal, not a near-zero output
    assert _max_abs(ours, theirs) <= 1e-5


def test_256_architecture_forward_matches_diffusers(tmp_path):
    # the 256² models' six levels with attention at 16², at reduced width and a 64² input
    unet = random_unet(narrow(DDPM_256_CONFIG, (32, 32, 64, 64, 128, 128)), seed=2)
    unet.save_pretrained(tmp_path)
    model = fastddpm.load(tmp_path)
    assert model.config.channel_mult == CONFIGS["ddpm-256"].channel_mult
    assert model.config.attn_resolutions == (16,) and model.config.image_size == 256
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    t = torch.tensor([999, 250])
    with torch.no_grad():
        assert _max_abs(model.unet(x, t), unet(x, t).sample) <= 1e-5


def _state(model):
    return model.unet.state_dict()


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_every_layout_loads_the_same_model(tmp_path):
    unet = random_unet(SMALL_CIFAR, seed=4)
    scheduler = DDPMScheduler(variance_type="fixed_small", clip_sample=False, beta_end=0.03)
    flat = fastddpm.load(_flat_folder(tmp_path / "flat", unet, scheduler))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipeline")
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)  # the .bin (pickle) weights
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    for folder in (tmp_path / "pipeline", tmp_path / "pipeline" / "unet", tmp_path / "bin"):
        other = fastddpm.load(folder)
        _assert_same_weights(flat, other)
        assert other.config == flat.config
    # the pipeline's scheduler, found from the pipeline and from its unet/ subfolder
    for folder in (tmp_path / "pipeline", tmp_path / "pipeline" / "unet"):
        model = fastddpm.load(folder)
        assert model.sampling == SamplingDefaults("fixed_small", clip=False)
        assert model.schedule.config.beta_end == 0.03
    # a UNet2DModel folder alone: the paper's schedule and our defaults
    assert fastddpm.load(tmp_path / "bin").schedule.config == ScheduleConfig()


def test_legacy_attention_names_load(tmp_path):
    """Weights saved by diffusers < 0.15 (query/key/value/proj_attn) load like current ones."""
    from safetensors.torch import load_file, save_file

    unet = random_unet(SMALL_CIFAR, seed=5)
    unet.save_pretrained(tmp_path / "new")
    state = load_file(tmp_path / "new" / "diffusion_pytorch_model.safetensors")
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    assert old != state
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    _assert_same_weights(fastddpm.load(tmp_path / "new"), fastddpm.load(tmp_path / "old"))


@pytest.mark.parametrize("scheduler_kwargs,kind", [
    ({"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03}, "linear"),
    ({"beta_schedule": "scaled_linear", "beta_start": 1e-4, "beta_end": 0.02}, "quadratic"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "cosine"),
    ({"trained_betas": torch.linspace(1e-4, 0.05, 400).tolist(), "num_train_timesteps": 400}, "custom"),
    ({"beta_schedule": "sigmoid", "beta_start": 1e-4, "beta_end": 0.03}, "custom"),  # as its betas
])
def test_scheduler_config_gives_diffusers_betas(scheduler_kwargs, kind, tmp_path):
    scheduler = DDPMScheduler(**scheduler_kwargs)
    scheduler.save_pretrained(tmp_path)
    random_unet(SMALL_CIFAR).save_pretrained(tmp_path)
    model = fastddpm.load(tmp_path)
    assert model.schedule.config.kind == kind
    # diffusers keeps β in float32; ours is float64
    torch.testing.assert_close(model.schedule.betas.float(), scheduler.betas, rtol=1e-6, atol=0)
    # and written back out, diffusers rebuilds the same β from our scheduler config
    save_folder(model, tmp_path / "out")
    back = DDPMScheduler.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(back.betas, scheduler.betas, rtol=1e-6, atol=0)


def _noise(table, batch: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """x_T, then each step's z: the numbers our runtime draws (see fastddpm.runtime.Sampler)."""
    first = gaussian(SEED, torch.arange(batch), 0, shape, INIT_STREAM)
    return [first] + [gaussian(SEED, torch.arange(batch), i, shape, STEP_STREAM)
                      for i in range(table.num_steps)]


class _NoiseFeed:
    """Stands in for diffusers' `randn_tensor`: hands out our noise, in order."""

    def __init__(self, noise: list[torch.Tensor], shape: tuple[int, ...]):
        self.queue, self.shape, self.drawn = list(noise), shape, 0

    def __call__(self, shape, *args, dtype=None, **kwargs):
        assert tuple(shape[1:]) == self.shape
        self.drawn += 1
        return self.queue.pop(0).to(dtype)


STEPS, BATCH, SEED = 20, 2, 11




# Both sides run in float64, tables included. A random-weight U-Net amplifies a perturbation of
# its input about 3× per step (measured: a 1.4e-6 float32 difference in ε at step 0 grows to
# 8e-2 by step 20 under DDIM η=0), so in float32 the runs would part by chaos, not by any
# difference in the algorithm; the fp32 forward itself is held to 1e-5 by the tests above.
DTYPE = torch.float64


@pytest.fixture
def same_timestep_embedding(monkeypatch):
    """diffusers computes the sinusoid's frequencies as (−log 10⁴ · k) / (half − 1), the original
    code and we as k · (−log 10⁴ / (half − 1)): equal up to float32 rounding, which alone moves ε
    by ~3e-7 — then amplified as above. Give diffusers our embedding for the chained runs (the
    forward tests above keep diffusers' own)."""
    def ours(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
             max_period=10000):
        assert (flip_sin_to_cos, downscale_freq_shift, scale, max_period) == (False, 1, 1, 10000)
        return timestep_embedding(timesteps, embedding_dim)

    monkeypatch.setattr(embeddings, "get_timestep_embedding", ours)


def _ours(model, sampler, eta=0.0):
    """Our sampling loop as fastddpm.runtime.Sampler runs it (same table, same noise, same
    reverse-step reference), with the table kept in float64 rather than cast to float32."""
    table = model.table(sampler=sampler, steps=STEPS, eta=eta if sampler == "ddim" else None,
                        spacing="leading")
    cfg = model.config
    shape = (cfg.out_channels, cfg.image_size, cfg.image_size)
    noise = _noise(table, BATCH, shape)
    unet = copy.deepcopy(model.unet).to(DTYPE)
    x = noise[0].to(DTYPE)
    with torch.no_grad():
        for i, t in enumerate(table.timesteps.tolist()):
            eps = unet(x, torch.full((BATCH,), t))
            x, _ = reverse_step_reference(x, eps, table.coef[i], noise[i + 1], None, table.clip)
    return noise, shape, (x / 2 + 0.5).clamp(0, 1)  # the pipelines' own output mapping


def _assert_close_and_informative(ours, theirs):
    inside = ((theirs > 0) & (theirs < 1)).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of pixels unclamped: the comparison would be blind"
    assert _max_abs(ours, theirs) <= 1e-4


# Unclipped, a random-weight model's x̂0 runs far outside [−1, 1] and the pipelines' final clamp
# would hide any difference (the check below refuses such a blind run); the unclipped updates
# are compared with diffusers' schedulers in test_samplers.py.
@pytest.mark.parametrize("variance,clip", [("fixed_large", True), ("fixed_small", True)])
def test_ddpm_sampling_matches_ddpm_pipeline(variance, clip, tmp_path, monkeypatch,
                                             same_timestep_embedding, one_thread):
    unet = random_unet(SMALL_CIFAR_16, seed=6)
    folder = _flat_folder(tmp_path, unet, DDPMScheduler(variance_type=variance, clip_sample=clip))
    model = fastddpm.load(folder)
    noise, shape, ours = _ours(model, "ddpm")

    feed = _NoiseFeed(noise, shape)
    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", feed)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", feed)
    pipe = DDPMPipeline(unet=unet.to(DTYPE), scheduler=DDPMScheduler.from_pretrained(folder))
    with_float64_tables(pipe.scheduler, model.schedule)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=BATCH, num_inference_steps=STEPS, output_type="pt").images
    # x_T and one z per step but the last (t = 0 there: no noise, as Algorithm 2)
    assert feed.drawn == STEPS
    _assert_close_and_informative(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sampling_matches_ddim_pipeline(eta, tmp_path, monkeypatch, same_timestep_embedding,
                                             one_thread):
    """On the bundled (trained) model, written as a diffusers folder: a random U-Net's clipped DDIM
    chain ends mostly at ±1 (ε̂ follows the clipped x̂0), which would blind the comparison."""
    model = fastddpm.load("default")
    save_folder(model, tmp_path / "digits")
    noise, shape, ours = _ours(model, "ddim", eta)

    feed = _NoiseFeed(noise, shape)
    monkeypatch.setattr(pipeline_ddim, "randn_tensor", feed)
    monkeypatch.setattr(scheduling_ddim, "randn_tensor", feed)
    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(tmp_path / "digits").to(DTYPE),
                        scheduler=DDIMScheduler.from_pretrained(tmp_path / "digits"))
    assert pipe.scheduler.config.clip_sample
    with_float64_tables(pipe.scheduler, model.schedule)  # the pipeline rebuilds its scheduler: set them after
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=BATCH, num_inference_steps=STEPS, eta=eta, output_type="pt",
                  use_clipped_model_output=True).images  # our DDIM's ε̂ (see ddim_table)
    assert feed.drawn == (1 + STEPS if eta > 0 else 1)
    _assert_close_and_informative(ours, theirs)


SMALL = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attn_resolutions=(8,), dropout=0.0, groups=8)


def _random_model(schedule=ScheduleConfig(), sampling=SamplingDefaults("fixed_small", clip=False)):
    torch.manual_seed(8)
    model = DiffusionModel.create(SMALL, schedule, sampling)
    with torch.no_grad():  # random norms too, so a swapped weight/bias would show
        for p in model.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("schedule", [ScheduleConfig("linear", 1000),
                                      ScheduleConfig("cosine", 300),
                                      ScheduleConfig("quadratic", 500, 1e-4, 0.03),
                                      ScheduleConfig("custom", 50,
                                                     betas=torch.linspace(1e-3, 0.2, 50).tolist())])
def test_to_diffusers_and_back_is_lossless(schedule, tmp_path):
    model = _random_model(schedule)
    save_folder(model, tmp_path / "out")
    back = fastddpm.load(tmp_path / "out")
    _assert_same_weights(model, back)
    assert back.config == model.config and back.sampling == model.sampling
    assert back.schedule.config == model.schedule.config


def test_diffusers_loads_what_we_write(tmp_path):
    model = _random_model(ScheduleConfig("linear", 200, 1e-4, 0.05),
                          SamplingDefaults("fixed_large", clip=True))
    save_folder(model, tmp_path / "out")
    # every weight read, none missing, none left over; the same ε as ours
    unet, info = UNet2DModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    pipe = DDPMPipeline.from_pretrained(tmp_path / "out")
    config = pipe.scheduler.config
    assert (config.variance_type, config.clip_sample, config.num_train_timesteps) == \
        ("fixed_large", True, 200)
    torch.testing.assert_close(pipe.scheduler.betas, model.schedule.betas.float(), rtol=1e-6, atol=0)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 199])
    with torch.no_grad():
        ours = model.unet(x, t)
        assert _max_abs(ours, unet.eval()(x, t).sample) <= 1e-5
        assert _max_abs(ours, pipe.unet.eval()(x, t).sample) <= 1e-5


def test_cli_samples_from_a_diffusers_folder_and_converts_default(tmp_path, monkeypatch, capsys):
    from fastddpm import checkpoint
    from fastddpm.cli import main
    from fastddpm.images import to_uint8

    model = _random_model()
    save_folder(model, tmp_path / "hub")
    code = main(["sample", "--model", str(tmp_path / "hub"), "--num", "2", "--steps", "3",
                 "--out", str(tmp_path / "x.npz"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    # the same images as sampling the model in-process (same seed, same noise)
    direct = to_uint8(fastddpm.sample(model, num=2, steps=3))
    saved = np.load(tmp_path / "x.npz")
    assert np.array_equal(next(iter(saved.values())), direct)

    # `convert default` writes out whatever model `default` names
    fastddpm.save(model, tmp_path / "bundled.safetensors")
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "bundled.safetensors")
    assert main(["convert", "default", "-o", str(tmp_path / "model.pt")]) == 0
    _assert_same_weights(model, fastddpm.load(tmp_path / "model.pt"))


@pytest.mark.parametrize("scheduler,sampling", [
    (DDPMScheduler(prediction_type="v_prediction"), SamplingDefaults("fixed_small", True, "v_prediction")),
    (DDPMScheduler(prediction_type="sample", variance_type="fixed_small_log", clip_sample=False),
     SamplingDefaults("fixed_small", False, "sample")),  # the same σ, taken through its log
    (DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
                   set_alpha_to_one=True),  # the offset is kept for --spacing leading
     SamplingDefaults("fixed_small", True, "v_prediction", steps_offset=1)),
    (DPMSolverMultistepScheduler(solver_order=3, prediction_type="sample", use_karras_sigmas=True),
     SamplingDefaults("fixed_small", False, "sample")),  # its solver settings are diffusers' loop's
])
def test_scheduler_settings_read_into_sampling_defaults(scheduler, sampling, tmp_path):
    random_unet(SMALL_CIFAR).save_pretrained(tmp_path)
    scheduler.save_pretrained(tmp_path)
    model = fastddpm.load(tmp_path)
    assert model.sampling == sampling
    # written out as a DDPMScheduler that says the same, and read back the same
    save_folder(model, tmp_path / "out")
    back = DDPMScheduler.from_pretrained(tmp_path / "out")
    assert back.config.prediction_type == sampling.prediction
    assert fastddpm.load(tmp_path / "out").sampling == sampling


def test_legacy_predict_epsilon_key(tmp_path):
    """diffusers < 0.10 wrote predict_epsilon instead of prediction_type."""
    random_unet(SMALL_CIFAR).save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "predict_epsilon": False, "tensor_format": "pt"}))
    assert fastddpm.load(tmp_path).sampling.prediction == "sample"


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_model_files_keep_the_prediction_type(prediction, tmp_path):
    model = _random_model(sampling=SamplingDefaults("fixed_small", False, prediction))
    for name in ("m.pt", "m.safetensors"):
        fastddpm.save(model, tmp_path / name)
        assert fastddpm.load(tmp_path / name).sampling == model.sampling
    # an ε model's file says nothing new: files read by older fastddpm stay readable
    assert ("prediction" in model.sampling.to_dict()) == (prediction != "epsilon")
