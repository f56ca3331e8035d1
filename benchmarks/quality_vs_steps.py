"""Sample quality of a digits model against the number of ε evaluations, per sampler and grid.

The judge of `fastddpm eval` (fastddpm.judge) is trained once; then, for each cell (sampler,
steps, time grid), `num` samples of one seed are drawn and measured. Every sampler here takes one
ε evaluation per step, so steps = NFE; ε comes from one engine per file (`--backend`, `--dtype`,
`--quantize`; default: torch fp32, the reference). Cells are `sampler:steps:spacing` (`--cases`),
or the product of `--samplers`, `--spacings` and `--nfe`; a `tuned` cell for which the model has no
grid is skipped and listed. Writes STEM.json (every cell, added to as cells finish, so a run
can be resumed), STEM.md (one row per sampler and grid, one column per NFE) and, with --plot,
a PNG of the Fréchet ratio against NFE (matplotlib: `pip install -e ".[dev]"`):

    python benchmarks/quality_vs_steps.py --samplers ddim,dpm++ --spacings trailing,logsnr \\
        --nfe 4,5,6,8,10 --out benchmarks/results/default_model/quality_vs_nfe --plot
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
from fastddpm.samplers import SAMPLERS, SPACINGS

NFE = (4, 5, 6, 8, 10, 15, 20)


def cells(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    if args.cases:
        return [(s, int(n), g) for s, n, g in (case.split(":") for case in args.cases.split(","))]
    return [(s, n, g) for s in args.samplers.split(",") for g in args.spacings.split(",")
            for n in map(int, args.nfe.split(","))]


def paper_score(rows: list[dict]) -> float | None:
    """DDPM-1000's Fréchet ratio where the run measured it: the bar the few-step cells are held
    against (it gets no NFE column of its own)."""
    paper = [r["frechet_ratio"] for r in rows if r["sampler"] == "ddpm" and r["steps"] >= 1000]
    return paper[0] if paper else None


def table(rows: list[dict], meta: dict) -> str:
    """One row per (sampler, grid), one column per NFE, the Fréchet ratio in each cell."""
    paper = paper_score(rows)
    bar = f"; DDPM-1000: {paper:.2f}" if paper is not None else ""
    nfes = sorted({r["steps"] for r in rows if r["steps"] < 1000})
    engine = " ".join(filter(None, (meta.get("backend", "torch"), meta.get("dtype", "fp32"),
                                    meta.get("quantize"))))
    lines = [f"Model {meta['model']}, ε by {engine}; Fréchet ratio (lower is better{bar}), "
             f"{meta['num']} samples per cell, seed {meta['seed']}, {meta['machine']}, "
             f"torch {meta['torch']}, {meta['date']}.", "",
             "| sampler | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    # samplers in the registry's order, each one's grids in SPACINGS' order (tuned last)
    keys = sorted(dict.fromkeys((r["sampler"], r["spacing"]) for r in rows),
                  key=lambda k: (list(SAMPLERS).index(k[0]), SPACINGS.index(k[1])))
    for sampler, spacing in keys:
        got = {r["steps"]: r["frechet_ratio"] for r in rows
               if (r["sampler"], r["spacing"]) == (sampler, spacing)}
        lines.append(f"| {sampler} | {spacing} | "
                     + " | ".join(f"{got[n]:.2f}" if n in got else "" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    colours = plt.get_cmap("tab20")  # one colour per sampler (11 of them)
    styles = {"tuned": "-", "trailing": ":", "logsnr": "--"}  # the other grids: the table only
    for sampler, spacing in dict.fromkeys((r["sampler"], r["spacing"]) for r in rows
                                          if r["spacing"] in styles):
        pts = sorted((r["steps"], r["frechet_ratio"]) for r in rows
                     if (r["sampler"], r["spacing"]) == (sampler, spacing) and r["steps"] < 1000)
        style = styles[spacing]
        ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, lw=1.5,
                color=colours(samplers.index(sampler) % 20), label=f"{sampler} ({spacing})")
    if paper_score(rows) is not None:
        ax.axhline(paper_score(rows), color="black", lw=0.8, label="DDPM, 1000 steps")
    ax.set_xlabel("ε evaluations (NFE)")
    ax.set_ylabel("Fréchet ratio (lower is better)")
    ax.set_ylim(1.0, 2.0)  # the few cells above 2 are in the table
    ax.set_title("colour: sampler; line: grid (solid tuned, dotted trailing, dashed logsnr; "
                 "the other grids are in the table)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="torch", help="the ε engine (default: torch, the reference)")
    p.add_argument("--dtype", default="fp32", help="the ε engine's dtype (default: fp32)")
    p.add_argument("--quantize", default=None, help="the ε engine's quantization (default: none)")
    p.add_argument("--cases", default=None, help="sampler:steps:spacing,... (instead of the product)")
    p.add_argument("--samplers", default="ddim,dpm++")
    p.add_argument("--spacings", default="trailing,logsnr,tuned")
    p.add_argument("--nfe", default=",".join(map(str, NFE)))
    p.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    p.add_argument("--plot", action="store_true", help="also STEM.png")
    args = p.parse_args()
    model = load(args.model)
    judge = DigitClassifier(model.config.image_size)
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    # older files: torch fp32, none quantized
    engine = (old.get("backend", "torch"), old.get("dtype", "fp32"), old.get("quantize"))
    if old and engine != (args.backend, args.dtype, args.quantize):
        raise SystemExit(f"{out}.json holds cells of {' '.join(filter(None, engine))}; one file, "
                         "one engine (another --out)")
    # rows written before the grid was a column were all 'leading', then the only default
    rows = [{"spacing": "leading", **r} for r in old.get("results", [])]
    skipped = []
    meta = {"model": args.model, "num": args.num, "seed": args.seed, "backend": args.backend,
            "dtype": args.dtype, "quantize": args.quantize, "torch": torch.__version__,
            "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    for sampler, steps, spacing in cells(args):
        done = [r for r in rows if (r["sampler"], r["steps"], r["spacing"]) == (sampler, steps, spacing)]
        if done and done[0]["num"] == args.num:
            continue
        if spacing == "tuned" and model.sampling.grid(sampler, steps) is None:
            skipped.append(f"{sampler}:{steps}:tuned")
            continue
        start = time.perf_counter()
        x = sample(model, num=args.num, steps=steps, sampler=sampler, spacing=spacing, seed=args.seed,
                   device="cpu", backend=args.backend, dtype=args.dtype, quantize=args.quantize,
                   batch_size=500)
        seconds = time.perf_counter() - start
        rows.append({"sampler": sampler, "steps": steps, "spacing": spacing,
                     "sampling_seconds": round(seconds, 1), **digit_metrics(x, judge, args.seed)})
        print(json.dumps({k: rows[-1][k] for k in ("sampler", "steps", "spacing", "frechet_ratio")}),
              flush=True)
        out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    if skipped:
        print(f"no tuned grid in the model for {', '.join(skipped)}: skipped", flush=True)
    if len(rows) == len(old.get("results", [])):  # nothing new: the file's own machine and date
        meta = {k: v for k, v in old.items() if k != "results"} or meta
    out.with_suffix(".md").write_text(table(rows, meta))
    if args.plot:
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
