"""How close to this CPU's own limit does an ε forward run? Issue 14's speed targets are ratios
over diffusers; this puts a ceiling on them.

A model's FLOPs at one batch size (the CIFAR-10 U-Net at batch 1 unless told; the bundled
digits model with `--model digits`; torch.utils.flop_counter: 2 per multiply-add, the
convolutions and matmuls) over the median time of one forward of each engine — diffusers'
UNet2DModel in fp32 (the targets' peer, the same weights), fastddpm's openvino backend in f32,
bf16 and `--quantize int8` — against the FLOP rate of a large matrix product in torch (fp32 and
bf16: oneDNN/MKL's GEMM, as close to the CPU's peak as a library gets). One thread, and the
engines take turns one call each per round, so load from elsewhere on a shared machine slows
them alike. The CIFAR-10 U-Net has random weights: speed only.

    python benchmarks/cpu_roofline.py --out benchmarks/results/cpu-20261205/roofline
    python benchmarks/cpu_roofline.py --model digits --batch 64 --threads 2 --out STEM
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_sampler import _cpu_model, _diffusers_same_weights, cpu_facts  # this folder's

from fastddpm.model import DiffusionModel

GEMM_N = 2048


def gemm_rate(dtype: torch.dtype) -> float:
    """FLOP/s of an N×N×N matrix product in `dtype` (median of 10 after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(GEMM_N, GEMM_N, generator=g).to(dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * GEMM_N**3 / statistics.median(times)


def forward_flops(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.unet.set_kernels("reference")(x, t)
    return counter.get_total_flops()


def engines(model: DiffusionModel, threads: int) -> dict:
    """name → denoise(x, t) on `threads` threads."""
    from fastddpm.export.openvino import make

    unet = _diffusers_same_weights(model, f"{tempfile.mkdtemp(prefix='roofline-')}/model").unet

    @torch.inference_mode()
    def diffusers(x, t):
        return unet(x, t).sample

    cpu = torch.device("cpu")
    found = {"diffusers fp32": diffusers,
             "openvino f32": make(model, cpu, torch.float32, threads=threads)}
    for name, dtype, quantize in (("openvino bf16", torch.bfloat16, None),
                                  ("openvino int8", torch.float32, "int8"),
                                  ("openvino int8+bf16", torch.bfloat16, "int8")):
        try:
            found[name] = make(model, cpu, dtype, threads=threads, quantize=quantize)
        except Exception as e:  # noqa: BLE001 — a CPU without bf16, no nncf: say so, time the rest
            print(f"{name}: skipped ({e})", flush=True)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("cifar10", "digits"), default="cifar10")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="every engine's and the GEMM's")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = _cpu_model(args.model)
    model.unet.eval()
    cfg = model.config
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.full((args.batch,), model.schedule.config.num_timesteps // 2)
    flops = forward_flops(model, x, t)
    found = engines(model, args.threads)
    times: dict[str, list[float]] = {name: [] for name in found}
    for denoise in found.values():
        denoise(x, t)
    for _ in range(args.rounds):
        for name, denoise in found.items():
            start = time.perf_counter()
            denoise(x, t)  # the openvino engines take f32 I/O whatever their precision
            times[name].append(time.perf_counter() - start)
            time.sleep(0.1)  # no engine's threads spin into the next one's turn
    peaks = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    rows = []
    for name, calls in times.items():
        ms = 1e3 * statistics.median(calls)
        rows.append({"engine": name, "ms": round(ms, 2), "gflops": round(flops / ms / 1e6, 1),
                     "of_fp32_gemm": round(flops / ms * 1e3 / peaks["fp32"], 3)})
    result = {**cpu_facts(), "model": args.model, "batch": args.batch, "flops": flops,
              "threads": args.threads, "rounds": args.rounds,
              "gemm_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}, "results": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    gemm = result["gemm_gflops"]
    names = {"cifar10": "CIFAR-10 U-Net", "digits": "the bundled digits model"}
    model = names[result.get("model", "cifar10")]  # results before --model were CIFAR-10's
    threads = result["threads"]
    lines = [f"{model}, batch {result.get('batch', 1)}: {result['flops'] / 1e9:.2f} GFLOP a forward. "
             f"{result['cpu']}, {threads} thread{'s' * (threads > 1)}; a {GEMM_N}² matrix product "
             f"in torch: {gemm['fp32']} GFLOP/s fp32, "
             f"{gemm['bf16']} bf16. Median of {result['rounds']} rounds, {result['date']}.", "",
             "| engine | ms | GFLOP/s | of the fp32 GEMM rate | × diffusers |", "|---|---:|---:|---:|---:|"]
    base = next(r["ms"] for r in result["results"] if r["engine"] == "diffusers fp32")
    for r in result["results"]:
        lines.append(f"| {r['engine']} | {r['ms']:.1f} | {r['gflops']:.1f} | {r['of_fp32_gemm']:.0%} | "
                     f"{base / r['ms']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
