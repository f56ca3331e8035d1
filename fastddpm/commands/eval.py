"""`fastddpm eval`: are a digits model's samples recognisable digits (fastddpm.judge)? With
`--bpd`: the model's negative log-likelihood bound on real images, in bits/dim
(fastddpm.likelihood).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .. import data
from ..checkpoint import load
from ..errors import UserError
from ..images import check_output, save
from ..judge import DigitClassifier, digit_metrics
from ..likelihood import bits_per_dim
from ..options import MAX_BATCH, SamplingOptions, add_sampling_arguments
from ..runtime import sample


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="a model (default: the bundled digits one)")
    p.add_argument("--num", type=int, default=None,
                   help="samples to draw (default 1000); with --bpd, images to measure (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="also write the first 100 samples as a PNG grid")
    p.add_argument("--bpd", action="store_true",
                   help="measure the variational bound on -log p(x) in bits/dim on --data instead "
                        "(all T terms: num × T ε evaluations)")
    p.add_argument("--data", default="digits",
                   help="with --bpd: 'digits', a folder of images, a CIFAR-10 python folder or an .npz")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="with --bpd")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.num is not None and args.num <= 0:
        raise UserError(f"--num must be positive, got {args.num}")
    options = SamplingOptions.from_args(args)
    result = _bits_per_dim(args, options) if args.bpd else _sample_metrics(args, options)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def _bits_per_dim(args: argparse.Namespace, options: SamplingOptions) -> dict:
    execution = dict(device=options.device, backend=options.backend, dtype=options.dtype,
                     cuda_graph=options.cuda_graph, batch_size=options.batch_size)
    if options != SamplingOptions(**execution) or args.grid is not None:
        raise UserError("the sampler's options and --grid are for sample metrics; --bpd runs all "
                        "T terms of the bound")
    if (options.backend, options.dtype) != ("torch", "fp32"):
        raise UserError("--bpd runs the fp32 torch model (the bound is a float64 sum of "
                        "fp32 terms); drop --backend and --dtype")
    model = load(args.model)
    cfg = model.config
    ds = data.load(args.data, cfg.image_size, cfg.in_channels)
    images = ds.heldout if args.split == "heldout" else ds.train
    if len(images) == 0:
        raise UserError(f"the {args.split} split of {args.data} is empty; choose the other --split")
    num = len(images) if args.num is None else args.num
    if num > len(images):
        raise UserError(f"the {args.split} split of {args.data} has {len(images)} image(s); "
                        f"ask for at most that many with --num")
    start = time.perf_counter()
    bound = bits_per_dim(model, images[:num], seed=args.seed, device=options.device,
                         batch_size=options.batch_size or MAX_BATCH, progress=True)
    return {"model": args.model, "data": args.data, "split": args.split, "seed": args.seed,
            "seconds": round(time.perf_counter() - start, 1), **bound.summary()}


def _sample_metrics(args: argparse.Namespace, options: SamplingOptions) -> dict:
    if args.grid:
        check_output(args.grid)  # before minutes of sampling, not after
    model = load(args.model)
    cfg = model.config
    if cfg.in_channels != 1:
        raise UserError("eval measures digits models: the model must have 1 channel")
    classifier = DigitClassifier(cfg.image_size)
    start = time.perf_counter()
    x = sample(model, num=args.num or 1000, seed=args.seed, options=options, progress=True)
    seconds = time.perf_counter() - start
    if args.grid:
        save(x[:100], args.grid)
    return {"model": args.model, "sampler": options.sampler,
            "steps": options.steps or model.schedule.num_timesteps, "seed": args.seed,
            "sampling_seconds": round(seconds, 1), **digit_metrics(x, classifier, args.seed)}
