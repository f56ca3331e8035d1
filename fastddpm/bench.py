"""`fastddpm bench`: time the whole sampling loop of a model on this machine, per backend.

Each backend is warmed up once (compilation, autotuning, CUDA-graph capture), then timed over
`--repeats` full runs with the device synchronised at the end of each; the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from .backends import BACKENDS, resolve_device
from .checkpoint import load
from .errors import UserError
from .runtime import DTYPES, Sampler
from .samplers import SAMPLERS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampler(sampler: Sampler, batch: int, repeats: int) -> dict:
    """Median wall time of `repeats` full runs after one warm-up run."""
    sampler.run(seed=0, first=0, batch=batch)
    _sync(sampler.device)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        sampler.run(seed=r, first=0, batch=batch)
        _sync(sampler.device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    steps = sampler.table.num_steps
    return {"median_s": median, "min_s": min(times), "images_per_s": batch / median,
            "ms_per_step": 1e3 * median / steps, "steps": steps, "batch": batch, "repeats": repeats}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model file, or 'default'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--backends", default="torch",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default: torch)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per backend")


def run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0 or args.repeats <= 0:
        raise UserError("--batch-size and --repeats must be positive")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UserError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    device = resolve_device(args.device)
    model = load(args.model)
    table = model.table(args.sampler, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for backend in backends:
        sampler = Sampler(model, table, device, DTYPES[args.dtype], backend,
                          cuda_graph=not args.no_cuda_graph)
        result = {"backend": backend, "device": name, "dtype": args.dtype,
                  "sampler": args.sampler, "torch": torch.__version__,
                  **time_sampler(sampler, args.batch_size, args.repeats)}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{backend:>12} on {name} ({args.dtype}): {result['images_per_s']:.2f} img/s, "
                  f"{result['ms_per_step']:.2f} ms/step (batch {args.batch_size}, "
                  f"{result['steps']} {args.sampler} steps, median of {args.repeats})")
        sys.stdout.flush()
    return 0
