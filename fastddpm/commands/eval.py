"""`fastddpm eval`: are a digits model's samples recognisable digits (fastddpm.judge)? With
`--bpd`: the model's negative log-likelihood bound on real images, in bits/dim
(fastddpm.likelihood). With `--fid` / `--isc`: FID against a reference and Inception Score, over
samples drawn on the fly (sharded under torchrun) or read from `--samples` (fastddpm.fid).
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
    p.add_argument("-n", "--num", type=int, default=None,
                   help="samples to draw (default 1000; with --fid/--isc 50,000); with --bpd or "
                        "--samples, images to measure (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="also write the first 100 samples as a PNG grid")
    p.add_argument("--bpd", action="store_true",
                   help="measure the variational bound on -log p(x) in bits/dim on --data instead "
                        "(all T terms: num × T ε evaluations)")
    p.add_argument("--data", default="digits",
                   help="with --bpd: 'digits', a folder of images, a CIFAR-10 python folder or an .npz")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="with --bpd")
    p.add_argument("--fid", action="store_true",
                   help="FID of the samples against --ref (torch-fidelity's InceptionV3 features)")
    p.add_argument("--isc", action="store_true", help="the samples' Inception Score (10 splits)")
    p.add_argument("--ref", default=None, metavar="DIR|STATS.npz",
                   help="with --fid: a CIFAR-10 python folder (its training set), a folder of "
                        "images, an .npz of images, or an .npz of mu/sigma statistics")
    p.add_argument("--samples", default=None, metavar="DIR|X.npz",
                   help="with --fid/--isc: measure these images instead of drawing from --model")
    p.add_argument("--fid-dims", type=int, default=2048, choices=(64, 192, 768, 2048),
                   help="with --fid: the Inception features compared (default 2048, the standard; "
                        "FIDs of different dims are not comparable)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="torch-fidelity's InceptionV3 weights (.pth or .safetensors); default: "
                        "downloaded once into torch.hub's cache, where there is network")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.num is not None and args.num <= 0:
        raise UserError(f"--num must be positive, got {args.num}")
    options = SamplingOptions.from_args(args)
    if args.fid or args.isc:
        result = _fidelity(args, options)
    else:
        if args.ref or args.samples or args.inception_weights:
            raise UserError("--ref, --samples and --inception-weights are for --fid / --isc")
        result = _bits_per_dim(args, options) if args.bpd else _sample_metrics(args, options)
    if result is not None:  # under torchrun, rank 0 alone reports
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0


def _fidelity(args: argparse.Namespace, options: SamplingOptions) -> dict | None:
    from ..backends import resolve_device
    from ..distributed import init_distributed, rank_device
    from ..fidelity import measure

    if args.bpd or args.grid:
        raise UserError("--bpd and --grid do not go with --fid / --isc; run them separately")
    if args.fid and args.ref is None:
        raise UserError("--fid compares with reference images: add --ref DIR|STATS.npz (for the "
                        "paper's CIFAR-10 FID, the CIFAR-10 python folder)")
    if args.samples is not None and args.model != "default":
        raise UserError("measure either --samples or a --model's samples, not both")
    options = options.replace(device=rank_device(options.device))
    ctx = init_distributed(resolve_device(options.device).type)
    result = measure(args, options, ctx)
    ctx.close()
    return result


def _bits_per_dim(args: argparse.Namespace, options: SamplingOptions) -> dict:
    execution = dict(device=options.device, backend=options.backend, dtype=options.dtype,
                     cuda_graph=options.cuda_graph, batch_size=options.batch_size,
                     threads=options.threads, quantize=options.quantize)
    if options != SamplingOptions(**execution) or args.grid is not None:
        raise UserError("the sampler's options and --grid are for sample metrics; --bpd runs all "
                        "T terms of the bound")
    if options.backend not in ("torch", "auto") or options.dtype not in ("fp32", "auto") or options.quantize:
        raise UserError("--bpd runs the fp32 torch model (the bound is a float64 sum of "
                        "fp32 terms); drop --backend, --dtype and --quantize")
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
            "steps": model.plan(options)[0], "seed": args.seed,
            "sampling_seconds": round(seconds, 1), **digit_metrics(x, classifier, args.seed)}
