"""Whole-sampling throughput, side by side in one run: fastddpm (eager ε; torch.compile'd ε) and
diffusers' pipeline on the same U-Net architecture, same sampler, same steps, same batch.

    pytest benchmarks/bench_sampler.py --benchmark-json=out.json
    python benchmarks/bench_sampler.py cpu      # every CPU engine, fp32 and bf16, beside diffusers

Runs on CUDA when present (fastddpm with its CUDA-graph loop and fused kernels), else on the CPU.
Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import pytest
import torch

from fastddpm.dtypes import DTYPES, QUANTIZATIONS, dtype_name
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


# --- the CPU engines side by side: `python benchmarks/bench_sampler.py cpu` ------------------
#
# Every CPU engine of fastddpm (torch, compile, onnxruntime, openvino; fp32 and bf16; openvino
# int8; auto: the defaults, engine and dtype) beside diffusers' DDIMPipeline (fp32 eager, the
# same weights through a diffusers folder, the same DDIM steps, use_clipped_model_output=True),
# on the bundled model (batch 1, 64), the CIFAR-10 U-Net with random weights (batch 1, 16) and,
# asked for with `--cases hub128-b1` (seconds a step), diffusers' training example's 128²
# UNet2DModel (batch 1). Each measurement
# runs in a process of its own, so no two engines' thread pools are alive at once: one warm-up
# run (conversion, compilation, auto's pick), then `--repeats` runs of `--steps` DDIM steps;
# per-step ms is the median run over the steps. `--rounds R` runs every case's engines R times in
# turn (diffusers, the engines, diffusers again, ...) so that a change in the shared machine's
# load falls on neighbours alike: a row is then the median of its rounds, and its speed-up the
# median of the per-round ratios to diffusers. Plus the cold start: a fresh `fastddpm sample
# --sampler ddim --steps 20 --num 64` process to a written PNG, with the disk cache already warm
# (one run before).

CPU_CASES = {"digits-b1": ("digits", 1), "digits-b64": ("digits", 64),
             "cifar10-b1": ("cifar10", 1), "cifar10-b16": ("cifar10", 16),
             "hub128-b1": ("hub128", 1)}
# diffusers' unconditional training example's model (train_unconditional.py): UNet2DModel at
# 128² with its defaults (flipped embedding, multi-head attention of head dim 8, padding 1)
HUB128 = {"sample_size": 128, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
          "block_out_channels": (128, 128, 256, 256, 512, 512),
          "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4}
# backend[-dtype][-quantization]: openvino-int8-bf16 is int8 with what stays in float in bf16
CPU_IMPLS = ("diffusers", "torch", "torch-bf16", "compile", "compile-bf16", "onnxruntime",
             "openvino", "openvino-bf16", "openvino-int8", "openvino-int8-bf16", "auto")


def _cpu_model(config_name: str):
    from fastddpm.checkpoint import load

    if config_name == "digits":
        return load("default")  # the bundled weights
    torch.manual_seed(0)
    if config_name == "hub128":  # made by diffusers, read as a user's Hub folder is
        import tempfile

        from diffusers import DDPMScheduler, UNet2DModel

        folder = tempfile.mkdtemp(prefix="bench-hub128-")
        UNet2DModel(**HUB128).save_pretrained(f"{folder}/unet")
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(f"{folder}/scheduler")
        return load(f"{folder}/unet")  # its scheduler/ beside it, as in a pipeline
    return DiffusionModel.create(CONFIGS[config_name])


def _diffusers_same_weights(model, folder):
    """diffusers' DDIMPipeline over `model`'s own weights and schedule (a diffusers folder)."""
    import json
    from pathlib import Path

    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from fastddpm.interop.diffusers import save_folder

    save_folder(model, folder)
    config = json.loads((Path(folder) / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config({**config, "timestep_spacing": "leading"})
    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(folder).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_one(config_name: str, batch: int, impl: str, steps: int, repeats: int) -> dict:
    """Per-step ms of one engine on one case (run it in a process of its own)."""
    import statistics
    import tempfile
    import time

    model = _cpu_model(config_name)
    backend, *rest = impl.split("-")
    # a named engine runs fp32 unless the name says otherwise; `auto` is the defaults, dtype too
    dtype = next((r for r in rest if r in DTYPES), "auto" if backend == "auto" else "fp32")
    quantize = next((r for r in rest if r in QUANTIZATIONS), None)
    start = time.perf_counter()  # the first run's time includes building the engine
    if backend == "diffusers":
        folder = tempfile.mkdtemp(prefix="bench-diffusers-")
        pipe = _diffusers_same_weights(model, f"{folder}/model")

        def run(seed):
            pipe(batch_size=batch, num_inference_steps=steps, eta=0.0, output_type="np",
                 use_clipped_model_output=True, generator=torch.Generator().manual_seed(seed))
        engine = "diffusers"
    else:
        sampler = Sampler(model, sampler="ddim", steps=steps, spacing="leading", device="cpu",
                          backend=backend, dtype=dtype, quantize=quantize)

        def run(seed):
            sampler.run(seed=seed, first=0, batch=batch)
        engine = backend
    run(0)  # warm-up: conversion, export, compilation, auto's pick
    build_s = time.perf_counter() - start
    if backend == "auto":
        engine = f"{sampler.denoise.choices[batch]['engine']} {dtype_name(sampler.dtype)}"
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        run(r + 1)
        times.append(time.perf_counter() - start)
    return {"ms_per_step": 1e3 * statistics.median(times) / steps,
            "ms_per_step_min": 1e3 * min(times) / steps, "first_run_s": build_s, "engine": engine,
            "threads": torch.get_num_threads()}


def cold_start(tmp: str) -> dict:
    """Wall seconds of a fresh `fastddpm sample` process to a written PNG, disk cache warm."""
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "fastddpm", "sample", "--sampler", "ddim", "--steps", "20",
           "--num", "64", "--device", "cpu", "--no-progress", "--out", f"{tmp}/cold.png"]
    subprocess.run(cmd, check=True, capture_output=True)  # warms the disk cache (and auto's pick)
    start = time.perf_counter()
    done = subprocess.run(cmd + ["--verbose"], check=True, capture_output=True, text=True)
    return {"seconds": time.perf_counter() - start, "command": " ".join(cmd[1:]),
            "verbose": done.stderr.strip().splitlines()}


def cpu_facts() -> dict:
    import datetime
    import platform
    from importlib.metadata import PackageNotFoundError, version

    flags, name = set(), platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    versions = {}
    for package in ("torch", "onnxruntime", "openvino", "diffusers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"cpu": name, "cores": len(__import__("os").sched_getaffinity(0)),
            "amx": {"amx_tile", "amx_bf16"} <= flags, "avx512_bf16": "avx512_bf16" in flags,
            "versions": versions, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def per_engine(runs: list[dict]) -> list[dict]:
    """One row per (case, impl) from the rounds' runs: median ms/step, the fastest run's min, and
    the speed-up as the median over rounds of diffusers' ms/step over the engine's in that round."""
    import statistics

    rows = []
    for key in dict.fromkeys((r["case"], r["impl"]) for r in runs):
        mine = [r for r in runs if (r["case"], r["impl"]) == key]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            rows.append(mine[-1])
            continue
        ref = {r["round"]: r["ms_per_step"] for r in runs
               if (r["case"], r["impl"]) == (key[0], "diffusers") and "error" not in r}
        ratios = [ref[r["round"]] / r["ms_per_step"] for r in ok if r["round"] in ref]
        rows.append({**ok[-1], "rounds": len(ok),
                     "ms_per_step": statistics.median(r["ms_per_step"] for r in ok),
                     "ms_per_step_min": min(r["ms_per_step_min"] for r in ok),
                     "first_run_s": statistics.median(r["first_run_s"] for r in ok),
                     "speedup": statistics.median(ratios) if ratios else None})
    return rows


def _markdown(facts: dict, rows: list[dict], cold: dict | None, args) -> str:
    lines = [f"# CPU sampling: fastddpm's engines beside diffusers' DDIMPipeline ({facts['date']})", "",
             f"CPU: {facts['cpu']} ({facts['cores']} cores; AMX: {facts['amx']}, AVX512-BF16: "
             f"{facts['avx512_bf16']}). Versions: "
             + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()) + ".",
             f"DDIM, {args.steps} steps a run, median of {args.repeats} runs after a warm-up run, each "
             f"engine in a process of its own, {args.rounds} round(s) of every engine in turn. Speed-up: "
             "diffusers' ms/step over the engine's, the median of the rounds' ratios.", "",
             "| case | engine | ran | ms/step | min | speed-up vs diffusers | build + first run (s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['impl']} | refused: {row['error']} | | | | |")
            continue
        ratio = f"{row['speedup']:.2f}×" if row["speedup"] is not None else "–"
        lines.append(f"| {row['case']} | {row['impl']} | {row['engine']} | {row['ms_per_step']:.2f} | "
                     f"{row['ms_per_step_min']:.2f} | {ratio} | {row['first_run_s']:.1f} |")
    if cold is not None:
        lines += ["", f"Cold start (fresh process → written PNG, disk cache warm): "
                      f"{cold['seconds']:.2f} s for `{cold['command']}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import datetime
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    p = argparse.ArgumentParser(description="CPU engines beside diffusers (see the comment above)")
    sub = p.add_subparsers(dest="what", required=True)
    cpu = sub.add_parser("cpu", help="the whole side-by-side run")
    cpu.add_argument("--steps", type=int, default=4, help="DDIM steps a timed run (default 4)")
    cpu.add_argument("--repeats", type=int, default=5)
    cpu.add_argument("--rounds", type=int, default=1, help="every case's engines in turn, R times")
    cpu.add_argument("--cases", default=",".join(c for c in CPU_CASES if c != "hub128-b1"))
    cpu.add_argument("--impls", default=",".join(CPU_IMPLS))
    cpu.add_argument("--no-cold-start", action="store_true")
    cpu.add_argument("--out", default=None, help="default: benchmarks/results/cpu-<date>")
    one = sub.add_parser("one", help="one engine on one case (what `cpu` runs per process)")
    one.add_argument("case", choices=list(CPU_CASES))
    one.add_argument("impl", choices=list(CPU_IMPLS))
    one.add_argument("--steps", type=int, required=True)
    one.add_argument("--repeats", type=int, required=True)
    args = p.parse_args(argv)
    if args.what == "one":
        print(json.dumps(measure_one(*CPU_CASES[args.case], args.impl, args.steps, args.repeats)))
        return 0
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu-{stamp}")
    runs = []
    for case in args.cases.split(","):
        for round_ in range(args.rounds):
            for impl in args.impls.split(","):
                done = subprocess.run([sys.executable, __file__, "one", case, impl, "--steps",
                                       str(args.steps), "--repeats", str(args.repeats)],
                                      capture_output=True, text=True)
                run = {"case": case, "impl": impl, "round": round_}
                if done.returncode == 0:
                    run.update(json.loads(done.stdout.strip().splitlines()[-1]))
                else:  # an engine this machine cannot run (bf16 without native support, ...)
                    tail = done.stderr.strip().splitlines()
                    run["error"] = tail[-1][:200] if tail else "failed"
                runs.append(run)
                print(json.dumps(run), flush=True)
    rows = per_engine(runs)
    with tempfile.TemporaryDirectory() as tmp:
        cold = None if args.no_cold_start else cold_start(tmp)
    facts = cpu_facts()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**facts, "steps": args.steps, "repeats": args.repeats,
                                                   "rounds": args.rounds, "rows": rows, "runs": runs,
                                                   "cold_start": cold}, indent=2) + "\n")
    (out / "README.md").write_text(_markdown(facts, rows, cold, args))
    print(f"wrote {out}/results.json and README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
