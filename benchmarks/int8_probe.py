"""Would OpenVINO int8 (NNCF post-training quantization of the ε-model) close issue 14's CPU gap
without losing sample quality? A probe, not an engine.

The ε graph is the openvino backend's (fastddpm.export.openvino.convert); `nncf.quantize` runs on
a few hundred calibration inputs of the model's own distribution: x_t = q_sample(x_0, t) with t
stratified over [0, T) and x_0 the digits model's training digits (the CIFAR-10 U-Net has random
weights here, so its x_0 are uniform noise: it is timed, never judged). A few NNCF settings are
tried, each for a reason (VARIANTS). Measured:
- quality: the bundled digits model, `--num` samples of seed 0, DDIM-20 trailing and the default
  UniPC-4 on the model's tuned grid, with the int8 engine computing ε inside fastddpm's sampler
  (a registered backend; the step stays fastddpm's fp32 update), judged by fastddpm.judge against
  the same cells with OpenVINO f32 on seeds 0 and 1 (the judge's noise) and bf16; plus ε's
  relative RMS error against torch fp32 on held-out digits per quarter of [0, T);
- speed: one ε forward per engine — diffusers' UNet2DModel in fp32 eager (the peer of the
  targets), OpenVINO f32, bf16, int8, int8 with bf16 for what stays unquantized — in
  interleaved rounds (one engine computing at a time, a pause between engines so no pool spins
  into the next), on the CIFAR-10 U-Net at batch 1 and the digits model at batch 64 and 1.

    python benchmarks/int8_probe.py --out benchmarks/results/cpu-20261205/int8_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastddpm.backends import Backend, register_backend
from fastddpm.checkpoint import load
from fastddpm.export.openvino import convert
from fastddpm.export.quantize import KEEP_FLOAT
from fastddpm.judge import DigitClassifier, digit_metrics
from fastddpm.model import DiffusionModel
from fastddpm.runtime import sample
from fastddpm.unet import CONFIGS

# the U-Net's parts whose compute is negligible but which every output depends on directly: the
# time-embedding MLP and each block's projection of it (a (B, 512) matmul), and the first and
# last convolutions (1 or 3 channels: nothing for int8 to speed up) — what --quantize int8 keeps
KEEP = KEEP_FLOAT
ATTENTION = [r".*attn.*"]

# name → (why it is tried, nncf.quantize keywords)
VARIANTS = {
    "nncf-default": ("NNCF's defaults for a CNN: performance preset (symmetric), activation ranges "
                     "the mean over calibration items of each item's min/max, fast bias correction", {}),
    "minmax": ("activation ranges the global min/max: a U-Net's activations grow with t, and a "
               "mean of per-item maxima clips the high-t ones", {"minmax": True}),
    "minmax-keep": ("minmax, with the time embedding, its projections and the first and last "
                    "convolutions left in float (KEEP)", {"minmax": True, "keep": KEEP}),
    "minmax-keep-mixed": ("minmax-keep with asymmetric activations (mixed preset): SiLU outputs "
                          "lie in [-0.28, inf), half of a symmetric range is wasted",
                          {"minmax": True, "keep": KEEP, "preset": "mixed"}),
    "minmax-keep-attn": ("minmax-keep with the attention blocks left in float too",
                         {"minmax": True, "keep": KEEP + ATTENTION}),
    "minmax-keep-bc": ("minmax-keep with the full bias correction (fast_bias_correction=False)",
                       {"minmax": True, "keep": KEEP, "fast_bias_correction": False}),
    "histogram-keep": ("activation ranges from histograms (a clipping-vs-rounding optimum), KEEP in "
                       "float", {"histogram": True, "keep": KEEP}),
    # model_type transformer does more than SmoothQuant (NNCF 3.4's min_max code): the mixed preset,
    # and no quantizer on Add, GroupNorm/MVN, Multiply, Divide: residual sums stay float. Which of
    # these gives its lower error is not separated here.
    "smoothquant-keep": ("model_type transformer: SmoothQuant (alpha 0.95 on the matmuls, i.e. "
                         "attention; off on convolutions), mixed preset, no quantizers on Add, "
                         "GroupNorm/MVN, Multiply, Divide; minmax; KEEP in float",
                         {"minmax": True, "keep": KEEP, "smoothquant": True}),
}
QUALITY_CELLS = {"ddim-20": {"sampler": "ddim", "steps": 20, "spacing": "trailing"},
                 "unipc-4-tuned": {"sampler": "unipc", "steps": 4, "spacing": "tuned"}}
SPEED_CASES = {"cifar10-b1": ("cifar10", 1), "digits-b64": ("digits", 64), "digits-b1": ("digits", 1)}


def q_sample_items(model: DiffusionModel, x0: torch.Tensor, n: int, seed: int):
    """n pairs (x_t, t): x_0 drawn from x0, t stratified over [0, T), in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    T = len(model.schedule.alphas_cumprod)
    t = ((torch.arange(n) + torch.rand(n, generator=gen)) * T / n).long().clamp(max=T - 1)
    t = t[torch.randperm(n, generator=gen)]
    a = model.schedule.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    x0 = x0[torch.randint(len(x0), (n,), generator=gen)]
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen), t


def data_of(model: DiffusionModel, split: str, n: int, seed: int) -> torch.Tensor:
    """x_0 to noise: the digits (of `split`) for a digits model, else uniform noise images."""
    cfg = model.config
    if cfg.in_channels == 1:
        from fastddpm import data

        return getattr(data.digits(cfg.image_size), split)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1


def quantize(graph, items, variant: str):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    opts = VARIANTS[variant][1]
    x, t = items
    advanced = {}
    if opts.get("minmax"):
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    if opts.get("histogram"):
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.HISTOGRAM
    kwargs = {"subset_size": len(x),  # every item: NNCF's default takes the first 300
              "fast_bias_correction": opts.get("fast_bias_correction", True),
              "advanced_parameters": AdvancedQuantizationParameters(**advanced)}
    if "keep" in opts:
        kwargs["ignored_scope"] = nncf.IgnoredScope(patterns=opts["keep"])
    if opts.get("preset") == "mixed":
        kwargs["preset"] = nncf.QuantizationPreset.MIXED
    if opts.get("smoothquant"):
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    dataset = nncf.Dataset([{"x": x[i:i + 1].numpy(), "t": t[i:i + 1].numpy()} for i in range(len(x))])
    start = time.perf_counter()
    q = nncf.quantize(graph, dataset, **kwargs)
    return q, time.perf_counter() - start


def compile_ov(graph, hint: str, threads: int):
    import openvino as ov

    return ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                  "PERFORMANCE_HINT": "LATENCY",
                                                  "INFERENCE_NUM_THREADS": threads})


def int8_convolutions(compiled) -> dict[str, int]:
    """How many convolutions the CPU plugin runs at each precision (is int8 really in play?)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if str(info["layerType"].astype(str)) == "Convolution":
            prec = str(info["runtimePrecision"].astype(str))
            counts[prec] = counts.get(prec, 0) + 1
    return counts


def ov_denoiser(compiled):
    """`denoise(x, t) -> ε` over a compiled model, as the openvino backend's (fp32 I/O)."""
    request = compiled.create_infer_request()

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = request.infer({"x": np.ascontiguousarray(x.float().numpy()),
                             "t": np.ascontiguousarray(t.long().numpy())}, share_inputs=True)[0]
        return torch.from_numpy(np.array(out))
    return denoise


def eps_error(denoise, unet, held) -> list[float]:
    """ε's RMS error against torch fp32 over its RMS, per quarter of [0, T)."""
    x, t = held
    with torch.no_grad():
        ref = unet(x, t)
    err = denoise(x, t) - ref
    T = 1000
    quarters = [(t * 4 // T) == k for k in range(4)]
    return [round(float(err[q].pow(2).mean().sqrt() / ref[q].pow(2).mean().sqrt()), 4) for q in quarters]


def judge_cells(model, judge, name: str, compiled, num: int, seeds: list[int]) -> list[dict]:
    """The quality cells with `compiled` computing ε in fastddpm's sampler (a registered backend)."""
    register_backend(Backend(name, lambda *_: ov_denoiser(compiled)))
    rows = []
    for seed in seeds:
        for cell, choice in QUALITY_CELLS.items():
            start = time.perf_counter()
            x = sample(model, num=num, seed=seed, device="cpu", backend=name, batch_size=500, **choice)
            m = digit_metrics(x, judge, seed)
            rows.append({"engine": name, "cell": cell, "seed": seed,
                         "frechet_ratio": round(m["frechet_ratio"], 4),
                         "mean_top_probability": round(m["mean_top_probability"], 4),
                         "min_class_fraction": m["min_class_fraction"],
                         "sampling_seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quality(args, threads: int) -> dict:
    model = load("default")
    graph, unet = convert(model)
    calib = q_sample_items(model, data_of(model, "train", 0, 0), args.calib, seed=0)
    held = q_sample_items(model, data_of(model, "heldout", 0, 1), 512, seed=1)
    judge = DigitClassifier(model.config.image_size)
    out = {"variants": {}, "cells": []}
    for hint, seeds in (("f32", [0, 1]), ("bf16", [0])):
        compiled = compile_ov(graph, hint, threads)
        error = eps_error(ov_denoiser(compiled), unet, held)
        out["variants"][f"openvino-{hint}"] = {"eps_rel_rms_error_by_t_quarter": error}
        out["cells"] += judge_cells(model, judge, f"openvino-{hint}", compiled, args.num, seeds)
    for variant in args.variants.split(","):
        q, seconds = quantize(graph, calib, variant)
        compiled = compile_ov(q, "f32", threads)
        out["variants"][variant] = {"why": VARIANTS[variant][0], "quantize_seconds": round(seconds, 1),
                                    "convolutions_by_precision": int8_convolutions(compiled),
                                    "eps_rel_rms_error_by_t_quarter":
                                        eps_error(ov_denoiser(compiled), unet, held)}
        print(json.dumps({variant: out["variants"][variant]}), flush=True)
        seeds = [0, 1] if variant in args.speed_variants.split(",") else [0]
        out["cells"] += judge_cells(model, judge, f"int8-{variant}", compiled, args.num, seeds)
    return out


def diffusers_forward(model: DiffusionModel, threads: int):
    """diffusers' UNet2DModel over the model's own weights, fp32 eager: the targets' peer."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sampler import _diffusers_same_weights

    unet = _diffusers_same_weights(model, f"{tempfile.mkdtemp(prefix='int8-probe-')}/model").unet

    @torch.inference_mode()
    def denoise(x, t):
        torch.set_num_threads(threads)
        return unet(x, t).sample
    return denoise


def timed(engines: dict, x, t, args) -> dict:
    """Interleaved rounds: each engine `args.calls` forwards a round, alone, after a pause."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    per_round: dict[str, list[float]] = {name: [] for name in engines}
    for denoise in engines.values():  # warm-up: first-call allocations and reorders
        denoise(x, t)
        denoise(x, t)
    for _ in range(args.rounds):
        for name, denoise in engines.items():
            time.sleep(args.pause)  # the previous engine's pool stops spinning
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                denoise(x, t)
                calls.append(time.perf_counter() - start)
            times[name] += calls
            per_round[name].append(statistics.median(calls))
    medians = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    best_float = min(("openvino-f32", "openvino-bf16"), key=medians.get)

    def paired(name: str, base: str) -> float:  # the median over rounds of per-round ratios
        pairs = zip(per_round[name], per_round[base], strict=True)
        return round(statistics.median(b / a for a, b in pairs), 3)
    return {"ms_median": {k: round(v, 2) for k, v in medians.items()},
            "ms_min": {k: round(1e3 * min(v), 2) for k, v in times.items()},
            "best_float_openvino": best_float,
            "speedup_over_best_float_openvino": {k: paired(k, best_float) for k in engines},
            "speedup_over_diffusers_forward": {k: paired(k, "diffusers-fp32") for k in engines}}


def speed(args, _threads: int) -> dict:
    out = {}
    for case in args.cases.split(","):
        config, batch = SPEED_CASES[case]
        torch.manual_seed(0)
        model = load("default") if config == "digits" else DiffusionModel.create(CONFIGS[config])
        graph, _unet = convert(model)
        n = args.calib if config == "digits" else args.cifar_calib
        calib = q_sample_items(model, data_of(model, "train", n, 0), n, seed=0)
        graphs = {"openvino": graph} | {f"int8-{v}": quantize(graph, calib, v)[0]
                                        for v in args.speed_variants.split(",")}
        x, t = q_sample_items(model, data_of(model, "heldout", batch, 2), batch, seed=2)
        out[case] = {"batch": batch}
        for threads in map(int, args.speed_threads.split(",")):
            engines = {"diffusers-fp32": diffusers_forward(model, threads)}
            for name, g in graphs.items():
                for hint in ("f32", "bf16"):
                    label = (f"{name}-{hint}" if name == "openvino"
                             else name + ("+bf16" if hint == "bf16" else ""))
                    engines[label] = ov_denoiser(compile_ov(g, hint, threads))
            out[case][f"threads={threads}"] = timed(engines, x, t, args)
            print(json.dumps({f"{case}, {threads} threads": out[case][f"threads={threads}"]}), flush=True)
    return out


def machine() -> dict:
    import openvino as ov

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines()[::-1] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}  # the first processor's
    model = fields.get("model name", platform.processor())
    flags = fields.get("flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni"))]
    return {"cpu": model, "cores": os.cpu_count(), "flags": wanted,
            "openvino_capabilities": ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
            "loadavg_at_start": os.getloadavg()}


def main() -> None:
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)  # its per-node INFO lines

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="NNCF settings judged on quality")
    p.add_argument("--speed-variants", default="nncf-default,minmax-keep",
                   help="the int8 variants timed (and judged on a second seed)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--calib", type=int, default=300, help="calibration items of the digits model")
    p.add_argument("--cifar-calib", type=int, default=64,
                   help="calibration items of the CIFAR-10 U-Net (random weights: timed only)")
    p.add_argument("--cases", default=",".join(SPEED_CASES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=3, help="ε forwards per engine per round")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between engines")
    p.add_argument("--speed-threads", default="1,2",
                   help="thread counts timed: on a loaded 2-core machine 2 threads measure the load as "
                        "much as the engine (an OpenMP barrier waits for a descheduled thread)")
    p.add_argument("--skip", choices=["quality", "speed"], default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    threads = torch.get_num_threads()
    result = {"command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "threads": threads,
              "versions": {"openvino": ov.__version__, "nncf": nncf.__version__,
                           "torch": torch.__version__},
              "calibration": {"digits": f"{args.calib} q_sample items of the training digits, "
                                        "t stratified over [0, T)",
                              "cifar10": f"{args.cifar_calib} q_sample items of uniform-noise x_0 "
                                         "(random weights)"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for part, run in (("quality", quality), ("speed", speed)):
        if args.skip != part:
            result[part] = run(args, threads)
            result["machine"]["loadavg_after_" + part] = os.getloadavg()
            out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
