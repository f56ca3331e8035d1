"""Honest wall-clock timing of the whole sampling loop: a warm-up run first (compilation,
autotuning, CUDA-graph capture), the device synchronised at the end of every run, medians."""
from __future__ import annotations

import statistics
import time

import torch

from .runtime import Sampler


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampler(sampler: Sampler, batch: int, repeats: int) -> dict:
    """Median wall time of `repeats` full runs after one warm-up run."""
    sampler.run(seed=0, first=0, batch=batch)
    synchronize(sampler.device)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        sampler.run(seed=r, first=0, batch=batch)
        synchronize(sampler.device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    steps = sampler.table.num_steps
    return {"median_s": median, "min_s": min(times), "images_per_s": batch / median,
            "ms_per_step": 1e3 * median / steps, "steps": steps, "batch": batch, "repeats": repeats}
