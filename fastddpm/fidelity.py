"""`fastddpm eval --fid / --isc` as a job: the samples (drawn on the fly, or read from a file),
their Inception features, the reference's statistics, and the JSON result.

Under torchrun each rank takes every W-th chunk of the samples (a model's chunks are its
sampling batches, fastddpm.shards, so sample k is the same image as `fastddpm sample` writes),
feeds them through Inception, and keeps only the feature sums that fastddpm.fid reduces across
ranks; IS gathers the logits in sample order. Rank 0 reports.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import fid
from .backends import resolve_device
from .distributed import Distributed
from .dtypes import dtype_name
from .errors import UserError
from .inception import Inception
from .limits import check_fits
from .options import SamplingOptions
from .progress import progress_bar
from .shards import draw, in_rounds, model_hash

DEFAULT_NUM = 50_000  # the paper's (and every FID table's) sample count
# what IS keeps of each sample: its 1008 float32 logits, gathered in sample order into one
# tensor, and that in float64 twice (the score's copy and its log-softmax). FID keeps sums only
IS_BYTES_PER_SAMPLE = 1008 * (4 + 4 + 8 + 8)


def _source(args: argparse.Namespace, options: SamplingOptions):
    """(what is measured, num, images(first, n) → (n, H, W, C) uint8)."""
    if args.samples is not None:
        images = fid.read_images(args.samples)
        num = len(images) if args.num is None else args.num
        if num > len(images):
            raise UserError(f"{args.samples} holds {len(images)} images; ask for at most that many "
                            "with --num")
        return {"samples": args.samples}, num, lambda first, n: images[first:first + n]
    from .checkpoint import load
    from .runtime import Sampler, check_request

    num = DEFAULT_NUM if args.num is None else args.num
    check_request(num, args.seed)
    model = load(args.model)
    runner = Sampler(model, options)
    about = {"model": args.model, "model_hash": model_hash(model), "seed": args.seed,
             "sampler": options.sampler, "steps": runner.table.num_steps,
             "dtype": dtype_name(runner.dtype)}  # what --dtype auto resolved to here
    return about, num, lambda first, n: draw(runner, args.seed, first, n)


def measure(args: argparse.Namespace, options: SamplingOptions, ctx: Distributed) -> dict | None:
    """The FID / IS result (rank 0; None on the other ranks)."""
    start = time.perf_counter()
    # everything that can be wrong with the input, before minutes of sampling or Inception
    reference = fid.Reference.open(args.ref, args.fid_dims) if args.fid else None
    about, num, images = _source(args, options)
    if args.fid and num < 2:
        raise UserError(f"a covariance of Inception features needs at least 2 samples, got {num}")
    if args.isc and num < fid.IS_SPLITS:
        raise UserError(f"the Inception Score averages {fid.IS_SPLITS} splits and needs at least "
                        f"{fid.IS_SPLITS} samples, got {num}")
    if args.isc:
        check_fits(f"the Inception Score of {num} samples", num * IS_BYTES_PER_SAMPLE,
                   "ask for fewer (--num)")
    net = Inception(args.inception_weights, resolve_device(options.device), args.fid_dims,
                    logits=args.isc)
    chunks = options.batches(num)
    ref = reference.statistics(net, ctx, chunks[0][1]) if args.fid else None
    sums, logits = fid.FeatureSums(net.dims, net.device), []

    def measure_chunk(chunk: tuple[int, int]) -> int:
        first, n = chunk
        pool, lg = net.features(images(first, n))
        sums.add(pool)
        if args.isc:
            logits.append(lg.cpu())
        return n

    with progress_bar(ctx.main, total=num, unit="img",
                      desc=f"Inception features on {ctx.world} rank(s)") as update:
        in_rounds(chunks[ctx.rank::ctx.world], ctx, measure_chunk, update)
    sums.reduce(ctx)
    all_logits = fid.gather_in_order(logits, chunks, ctx) if args.isc else None
    if not ctx.main:
        return None
    result = {**about, "num": num}
    if args.fid:
        mu, sigma = sums.statistics()
        ref_mu, ref_sigma, ref_num, origin = ref
        result.update(fid=fid.frechet_distance(mu, sigma, ref_mu, ref_sigma), fid_dims=net.dims,
                      ref=args.ref, ref_num=ref_num, ref_statistics=origin)
        if num <= net.dims:
            print(f"note: {num} samples ≤ {net.dims} features: the covariance is singular and FID "
                  "is biased upward; compare FIDs only at the same sample count", file=sys.stderr)
    if args.isc:
        mean, std = fid.inception_score(all_logits)
        result.update(isc_mean=mean, isc_std=std)
    result.update(inception_weights=args.inception_weights or "torch-fidelity's default",
                  inception_digest=net.digest[:16], world=ctx.world,
                  seconds=round(time.perf_counter() - start, 1))
    return result
