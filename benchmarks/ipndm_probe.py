"""Would a linear multistep method on ε beat the shipped solvers at 4–6 NFE? A probe, not a sampler.

iPNDM (Zhang & Chen's improved PNDM, as in diff-sampler) steps DDIM with an Adams–Bashforth
combination of the newest ε's — ε, (3ε₀ − ε₁)/2, (23ε₀ − 16ε₁ + 5ε₂)/12, then
(55ε₀ − 59ε₁ + 37ε₂ − 9ε₃)/24 — where fastddpm's tables keep a history of x̂0, not ε, so it
would need an ε ring in the step kernel, the ONNX step graph and the C++ sampler. This script
runs it in plain float64 torch over the model's ε (same x_T as `fastddpm sample`, the same
clipping as fastddpm's DDIM: the direction term from the clipped x̂0) and judges 1,000 samples
with the digits judge, so the decision to build it rests on a measurement:

    python benchmarks/ipndm_probe.py --nfe 4,5,6 --grids trailing,tuned --orders 2,3,4 \\
        --out benchmarks/results/default_model/ipndm_probe.json

`tuned` uses the model's UniPC grid at that NFE (the grid fastddpm's default runs).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastddpm.checkpoint import load
from fastddpm.judge import DigitClassifier, digit_metrics
from fastddpm.runtime import Sampler

# Adams–Bashforth weights on ε, newest first, by the number of ε's available (at most 4)
AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.inference_mode()
def ipndm(model, x: torch.Tensor, timesteps: list[int], clip: bool, max_order: int = 4) -> torch.Tensor:
    ac = model.schedule.alphas_cumprod  # float64
    eps_history: list[torch.Tensor] = []
    x = x.double()
    for i, t in enumerate(timesteps):
        batch_t = torch.full((x.shape[0],), t, dtype=torch.long)
        eps_history.insert(0, model.unet(x.float(), batch_t).double())
        del eps_history[max_order:]
        eps = sum(w * e for w, e in zip(AB[len(eps_history)], eps_history, strict=False))
        a_t = ac[t]
        a_next = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x.float().clamp(-1.0, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nfe", default="4,5,6")
    p.add_argument("--grids", default="trailing,tuned")
    p.add_argument("--orders", default="4", help="highest Adams-Bashforth orders to try (iPNDM: 4)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model = load(args.model)
    if model.sampling.prediction != "epsilon":
        raise SystemExit("the probe runs ε-prediction models")
    judge = DigitClassifier(model.config.image_size)
    rows = []
    cells = [(g, n, k) for g in args.grids.split(",") for n in map(int, args.nfe.split(","))
             for k in map(int, args.orders.split(","))]
    for grid, nfe, order in cells:
        if grid == "tuned" and model.sampling.grid("unipc", nfe) is None:
            continue
        # the timesteps and x_T fastddpm's own samplers use for this grid and seed
        runner = Sampler(model, sampler="unipc", steps=nfe, spacing=grid, device="cpu", backend="torch")
        timesteps = runner.table.timesteps.tolist()
        start = time.perf_counter()
        x = torch.cat([ipndm(model, runner.initial_noise(args.seed, first, n), timesteps,
                             runner.table.clip, order)
                       for first in range(0, args.num, args.batch_size)
                       for n in [min(args.batch_size, args.num - first)]])
        rows.append({"sampler": f"ipndm (probe), order ≤ {order}", "steps": nfe, "spacing": grid,
                     "timesteps": timesteps, "sampling_seconds": round(time.perf_counter() - start, 1),
                     **digit_metrics(x, judge, args.seed)})
        print(json.dumps({k: rows[-1][k] for k in ("sampler", "steps", "spacing", "frechet_ratio")}),
              flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "num": args.num, "seed": args.seed, "torch": torch.__version__,
                   "results": rows}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
