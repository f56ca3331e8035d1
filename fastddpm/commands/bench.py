"""`fastddpm bench`: time the whole sampling loop of a model on this machine, per backend.

Each backend is warmed up once (compilation, autotuning, CUDA-graph capture), then timed over
`--repeats` full runs with the device synchronised at the end of each; the median is reported
(fastddpm.timing).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..backends import backend_names
from ..checkpoint import load
from ..dtypes import dtype_name
from ..errors import UserError
from ..options import MAX_BATCH, SamplingOptions, add_sampling_arguments
from ..runtime import Sampler
from ..timing import time_sampler


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model file, or 'default'")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, from {', '.join(backend_names())} (default: --backend's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object per backend")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    options = SamplingOptions.from_args(args)
    if args.repeats <= 0:
        raise UserError(f"--repeats must be positive, got {args.repeats}")
    names = [b.strip() for b in (args.backends or options.backend).split(",") if b.strip()]
    if not names:
        raise UserError("--backends names no backend")
    runs = [options.replace(backend=name) for name in names]  # refuses unknown names first
    model = load(args.model)
    batch = options.batch_size or MAX_BATCH
    for run_options in runs:
        sampler = Sampler(model, run_options)
        device = sampler.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        result = {"backend": run_options.backend, "device": name, "dtype": dtype_name(sampler.dtype),
                  "quantize": run_options.quantize, "sampler": run_options.sampler,
                  "torch": torch.__version__,
                  **time_sampler(sampler, batch, args.repeats)}
        # what auto picked for this batch, and the ε timings it picked by
        choice = getattr(sampler.denoise, "choices", {}).get(batch)
        if choice is not None:
            result.update(engine=choice["engine"], auto_ms=choice.get("ms"))
        if args.json:
            print(json.dumps(result))
        else:
            engine = f" → {result['engine']}" if "engine" in result else ""
            precision = ", ".join(filter(None, (result["dtype"], run_options.quantize)))
            print(f"{run_options.backend:>12}{engine} on {name} ({precision}): "
                  f"{result['images_per_s']:.2f} img/s, {result['ms_per_step']:.2f} ms/step "
                  f"(batch {batch}, {result['steps']} {run_options.sampler} steps, "
                  f"median of {args.repeats})")
        sys.stdout.flush()
    return 0
