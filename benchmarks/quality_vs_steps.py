"""Sample quality of a digits model against the number of sampling steps, per sampler.

The judge of `fastddpm eval` (fastddpm.judge) is trained once; then, for each (sampler, steps),
`num` samples of one seed are drawn and measured. Writes a JSON list and a markdown table:

    python benchmarks/quality_vs_steps.py --out benchmarks/results/default_model/quality_vs_steps
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fastddpm.checkpoint import load
from fastddpm.judge import DigitClassifier, digit_metrics
from fastddpm.runtime import sample

CASES = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddim", 200), ("dpm++", 10), ("dpm++", 20),
         ("dpm++", 50), ("ddpm", 100), ("ddpm", 1000)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", default=",".join(f"{s}:{n}" for s, n in CASES),
                   help="sampler:steps,... (default: %(default)s)")
    p.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    args = p.parse_args()
    model = load(args.model)
    judge = DigitClassifier(model.config.image_size)
    rows = []
    for case in args.cases.split(","):
        sampler, steps = case.split(":")
        start = time.perf_counter()
        x = sample(model, num=args.num, steps=int(steps), sampler=sampler, seed=args.seed,
                   device="cpu", batch_size=500)
        seconds = time.perf_counter() - start
        rows.append({"sampler": sampler, "steps": int(steps), "sampling_seconds": round(seconds, 1),
                     **digit_metrics(x, judge, args.seed)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": args.model, "num": args.num, "seed": args.seed, "torch": torch.__version__,
            "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    lines = [f"{args.num} samples per row, seed {args.seed}, {meta['machine']}, torch {meta['torch']}, "
             f"{meta['date']}.", "",
             "| sampler | steps | Fréchet ratio | mean top-class p | smallest class | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['frechet_ratio']:.2f} | "
              f"{r['mean_top_probability']:.3f} | {100 * r['min_class_fraction']:.1f} % | "
              f"{r['sampling_seconds']:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
