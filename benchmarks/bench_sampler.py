"""Whole-sampling throughput, side by side in one run: fastddpm (eager ε; torch.compile'd ε) and
diffusers' pipeline on the same U-Net architecture, same sampler, same steps, same batch.

    pytest benchmarks/bench_sampler.py --benchmark-json=out.json

Runs on CUDA when present (fastddpm with its CUDA-graph loop and fused kernels), else on the CPU.
Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import pytest
import torch

from fastddpm.dtypes import DTYPES
from fastddpm.model import DiffusionModel
from fastddpm.runtime import Sampler
from fastddpm.unet import CONFIGS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# case → (config, batch, DDIM steps, dtype); CPU cases are kept small enough to time in seconds
CASES = {
    "digits-b64-ddim20": ("digits", 64, 20, "fp32"),
    "cifar10-b1-ddim10": ("cifar10", 1, 10, "fp32"),
    "cifar10-b16-ddim10": ("cifar10", 16, 10, "fp32"),
}
if DEVICE.type == "cuda":
    CASES.update({
        "cifar10-b1-ddim100": ("cifar10", 1, 100, "fp32"),
        "cifar10-b64-ddim100": ("cifar10", 64, 100, "fp32"),
        "cifar10-b1-ddim100-fp16": ("cifar10", 1, 100, "fp16"),
        "cifar10-b64-ddim100-fp16": ("cifar10", 64, 100, "fp16"),
        "cifar10-b256-ddim50-fp16": ("cifar10", 256, 50, "fp16"),
    })


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _diffusers_pipeline(config_name: str, dtype: torch.dtype):
    """diffusers' UNet2DModel + DDIMPipeline built from the same architecture."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the peer measured here")
    DDIMPipeline, DDIMScheduler, UNet2DModel = (diffusers.DDIMPipeline, diffusers.DDIMScheduler,
                                                diffusers.UNet2DModel)

    cfg = CONFIGS[config_name]
    down, up = [], []
    res = cfg.image_size
    for _ in cfg.channel_mult:
        attn = res in cfg.attn_resolutions
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "UpBlock2D")
        res //= 2
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    unet = UNet2DModel(sample_size=cfg.image_size, in_channels=cfg.in_channels,
                       out_channels=cfg.out_channels, block_out_channels=widths,
                       layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
                       norm_num_groups=cfg.groups, norm_eps=cfg.eps, downsample_padding=0,
                       flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None)
    pipe = DDIMPipeline(unet=unet.to(DEVICE, dtype).eval(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("impl", ["fastddpm", "fastddpm-compile", "diffusers"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampling_throughput(benchmark, case, impl):
    config_name, batch, steps, dtype = CASES[case]
    benchmark.group = f"sampling {case} on {DEVICE.type}"
    torch.manual_seed(0)
    if impl == "diffusers":
        pipe = _diffusers_pipeline(config_name, DTYPES[dtype])

        def run():
            # the same DDIM update as ours (ε re-derived from the clipped x̂0; see ddim_table)
            pipe(batch_size=batch, num_inference_steps=steps, eta=0.0, output_type="np",
                 use_clipped_model_output=True)
            _sync()
    else:
        model = DiffusionModel.create(CONFIGS[config_name])
        backend = "compile" if impl == "fastddpm-compile" else "torch"
        sampler = Sampler(model, sampler="ddim", steps=steps, device=str(DEVICE), dtype=dtype,
                          backend=backend)

        def run():
            sampler.run(seed=0, first=0, batch=batch)
            _sync()
    run()  # warm-up: compilation, autotuning, CUDA-graph capture
    rounds = 3 if DEVICE.type == "cpu" else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "impl": impl, "torch": torch.__version__, "batch": batch, "steps": steps, "dtype": dtype,
        "images_per_s": batch / benchmark.stats.stats.median,
    })
