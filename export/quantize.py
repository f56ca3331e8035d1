"""int8 ε graphs for the openvino backend (`--quantize int8`): NNCF's post-training quantization
of the converted graph, calibrated on the model's own sampling trajectory, kept in the disk cache.

The recipe, and why (benchmarks/int8_probe.py; benchmarks/results/cpu-20261205): NNCF's defaults
take an activation's range as the mean over calibration items of each item's extremes, and a
U-Net's activations grow with t, so the high-t inputs get clipped (the bundled model's Fréchet
ratio +0.3 to +0.55 on 1,000 samples). Global min/max ranges, the time embedding, its per-block
projections and the first and last convolutions left in float (KEEP_FLOAT: negligible compute,
and every output depends on them directly), and NNCF's transformer model type (asymmetric
activations, no quantizers on the residual Adds, norms, Multiply and Divide; SmoothQuant on the
attention matmuls) held the judge within its noise.

Calibration needs no data set, so it works for a model loaded from a diffusers folder: CALIBRATION
draws a few images with DPM-Solver++ over a grid from T−1 down to 0 on the torch fp32 engine, and
every ε input on the way, one image at a time, is one item: the inputs any sampler feeds the
network. DPM-Solver++ because it runs on every schedule and prediction type (DDIM has no x̂0 at a
zero-SNR model's last t).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from fastddpm import __version__, disk_cache
from fastddpm.errors import require_extra
from fastddpm.model import DiffusionModel
from fastddpm.options import SamplingOptions
from fastddpm.runtime import Sampler
from fastddpm.sessions import model_hash

CALIBRATION = {"sampler": "dpm++", "steps": 25, "spacing": "linspace", "images": 12, "seed": 0}
# node names of the converted graph (the torch module's names under "__module.")
KEEP_FLOAT = [r".*time_embed\..*", r".*temb_proj.*", r"__module\.conv_in/.*", r"__module\.conv_out/.*"]
RECIPE = {"model_type": "transformer", "activation_ranges": "minmax", "keep_float": KEEP_FLOAT,
          "calibration": CALIBRATION}
log = logging.getLogger("fastddpm")


def import_nncf():
    return require_extra("nncf", "int8", "--quantize int8")


def calibration_items(model: DiffusionModel, threads: int) -> list[dict[str, np.ndarray]]:
    """The ε inputs {x: (1, C, H, W) f32, t: (1,) i64} of CALIBRATION's trajectory (every t of
    a model with fewer timesteps than its steps)."""
    steps = min(CALIBRATION["steps"], len(model.schedule.alphas_cumprod))
    options = SamplingOptions(sampler=CALIBRATION["sampler"], steps=steps,
                              spacing=CALIBRATION["spacing"], device="cpu", backend="torch",
                              dtype="fp32", threads=threads)
    sampler = Sampler(model, options)
    engine, items = sampler.denoise, []

    def recording(x, t):
        # copies: the sampler updates x in place after this call
        items.extend({"x": x[i:i + 1].numpy().copy(), "t": t[i:i + 1].numpy().copy()}
                     for i in range(x.shape[0]))
        return engine(x, t)

    sampler.denoise = recording
    # a bar of its own: on a large model this takes minutes (NNCF's passes show theirs after it)
    with tqdm(total=steps, desc="int8 calibration samples", unit="step", leave=False) as bar:
        sampler.run(CALIBRATION["seed"], 0, CALIBRATION["images"], on_progress=lambda i: bar.update(1))
    return items


def quantize(graph, items: list[dict[str, np.ndarray]]):
    """The int8 openvino.Model of the f32 ε graph `graph`, by RECIPE over `items`."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf.set_log_level(logging.ERROR)  # its INFO lines per pass are noise to a user
    # its progress bars tell a user what the wait is for, on stderr: stdout is the command's
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(
            graph, nncf.Dataset(items), subset_size=len(items),  # every item (its default: 300)
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(patterns=KEEP_FLOAT),
            advanced_parameters=AdvancedQuantizationParameters(
                activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))


def int8_graph_of(model: DiffusionModel, threads: int, f32_graph_of: Callable[[], tuple]):
    """The int8 ε graph of `model` and what must outlive it (as `f32_graph_of()`'s pair, the f32
    graph and its keep-alive): read from the disk cache when an entry for this model, recipe and
    the OpenVINO, NNCF and fastddpm versions is there (then None: the graph owns its weights),
    else calibrated, quantized (once: a minute on a CIFAR-10 U-Net with 2 threads) and stored."""
    import openvino as ov

    nncf = import_nncf()
    key = {"model": model_hash(model), "recipe": RECIPE, "openvino": ov.__version__,
           "nncf": nncf.__version__, "fastddpm": __version__}
    folder = disk_cache.load("openvino-int8", key)
    if folder is not None:
        return ov.Core().read_model(folder / "eps.xml"), None
    log.warning("quantizing the ε-model to int8 (once for this model; kept in %s)",
                disk_cache.cache_root())
    f32_graph, unet = f32_graph_of()
    graph = quantize(f32_graph, calibration_items(model, threads))
    disk_cache.store("openvino-int8", key,
                     lambda d: ov.save_model(graph, d / "eps.xml", compress_to_fp16=False))
    # what NNCF left in float may still be constants over the torch copy's memory
    return graph, (f32_graph, unet)
