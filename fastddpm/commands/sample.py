"""`fastddpm sample`: draw images from a model and write a PNG grid, an .npz or a folder.

Besides plain sampling, the paper's other uses of the reverse process (§4.3, fastddpm.paper):
`--progressive K` (Fig. 6), `--from IMAGES [--t T]` reconstruction from x_t (Fig. 7) and
`--from IMAGES --interpolate K` (Fig. 8)."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .. import data, images, paper
from ..distributed import launched_world
from ..errors import UserError
from ..files import refuse_overwriting_inputs
from ..options import SamplingOptions, add_sampling_arguments
from ..runtime import check_request, sample
from ..shards import refuse_unfinished


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="model file (.pt / .safetensors), a diffusers model or pipeline folder, an "
                        "original DDPM state dict, or 'default' for the bundled digits model")
    p.add_argument("-n", "--num", type=int, default=64,
                   help="number of images (default 64); under torchrun write -n: torchrun reads "
                        "--num as its own --numa-binding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png",
                   help="*.png (a grid), *.npz (uint8 NHWC array) or DIR/ (one PNG per image)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--progressive", type=int, default=None, metavar="K",
                   help="instead, the predicted x0 at K evenly spaced steps as sampling goes (the "
                        "paper's Fig. 6): a PNG grid, a row per image, the last column the sample")
    p.add_argument("--from", dest="source", default=None, metavar="IMAGES",
                   help="instead of noise, start from these images' x_t and decode (Fig. 7): an "
                        "image, a folder of them or an .npz (all of it; the first --num), or "
                        "'digits' / a CIFAR-10 folder (held-out images); a PNG grid shows a row "
                        "per image: the image, its reconstruction")
    p.add_argument("--t", type=int, default=None,
                   help="with --from: the timestep to encode to; the chain starts at the sampler's "
                        "visited timestep at or below it (default: T/2)")
    p.add_argument("--interpolate", type=int, default=None, metavar="K",
                   help="with --from: mix the x_t of images (1, 2), (3, 4), ... at K weights from 0 "
                        "to 1 and decode (Fig. 8); a PNG grid shows a row per pair: a, K mixes, b")
    p.add_argument("--verbose", action="store_true",
                   help="say which engine computes ε and why (auto: the timings it chose by)")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    fmt = images.check_output(args.out)  # fail before minutes of sampling, not after
    refuse_overwriting_inputs(args.out, args.model, args.source)
    if args.progressive is not None and args.source is not None:
        raise UserError("--progressive draws from noise; drop --from (or --progressive)")
    if args.source is None and (args.t is not None or args.interpolate is not None):
        raise UserError("--t and --interpolate start from images: add --from IMAGES")
    options = SamplingOptions.from_args(args)
    if not args.verbose:
        return _dispatch(args, fmt, options)
    from ..autoselect import explained

    with explained(options.backend):
        return _dispatch(args, fmt, options)


def _dispatch(args: argparse.Namespace, fmt: str, options: SamplingOptions) -> int:
    if launched_world() > 1:
        if args.progressive is not None or args.source is not None:
            raise UserError("--progressive and --from run in one process; run them without torchrun")
        return _sharded(args, options)
    refuse_unfinished(args.out)
    if args.progressive is not None:
        return _progressive(args, fmt, options)
    if args.source is not None:
        return _from_images(args, fmt, options)
    start = time.perf_counter()
    x = sample(args.model, num=args.num, seed=args.seed, options=options,
               progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    images.save(x, args.out)
    print(f"wrote {len(x)} images to {args.out} ({elapsed:.1f} s, {len(x) / elapsed:.2f} img/s)",
          file=sys.stderr)
    return 0


def _sharded(args: argparse.Namespace, options: SamplingOptions) -> int:
    """Under torchrun: this rank's share of the images, joined by rank 0 (fastddpm.shards)."""
    from ..backends import resolve_device
    from ..checkpoint import load
    from ..distributed import init_distributed, rank_device
    from ..shards import sample_to

    check_request(args.num, args.seed)
    options = options.replace(device=rank_device(options.device))
    model = load(args.model)
    ctx = init_distributed(resolve_device(options.device).type)
    start = time.perf_counter()
    drawn = sample_to(args.out, model, args.num, args.seed, options, ctx,
                      progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    if ctx.main:
        print(f"wrote {args.num} images to {args.out} ({drawn} drawn now on {ctx.world} ranks, "
              f"{elapsed:.1f} s)", file=sys.stderr)
    ctx.close()
    return 0


def _progressive(args: argparse.Namespace, fmt: str, options: SamplingOptions) -> int:
    if fmt != "png":
        raise UserError("--progressive draws a PNG grid (a row per image, a column per snapshot); "
                        "end --out in .png")
    if options.batch_size is not None:
        raise UserError("--progressive draws its --num images in one batch; drop --batch-size")
    # paper.progressive bounds what it keeps before it samples
    frames = paper.progressive(args.model, num=args.num, snapshots=args.progressive,
                               seed=args.seed, options=options)
    images.save(frames.transpose(0, 1).flatten(0, 1), args.out, nrow=args.progressive)
    print(f"wrote {args.num} images × {args.progressive} snapshots to {args.out}", file=sys.stderr)
    return 0


def _from_images(args: argparse.Namespace, fmt: str, options: SamplingOptions) -> int:
    """Reconstruction (Fig. 7) or, with --interpolate, interpolation (Fig. 8) of --from images."""
    if options.batch_size is not None:
        raise UserError("--from decodes its images in one batch; drop --batch-size")
    from ..checkpoint import load

    model = load(args.model)
    cfg = model.config
    check_request(args.num, args.seed)
    x0 = data.images(args.source, cfg.image_size, cfg.in_channels)[:args.num]
    t = model.schedule.num_timesteps // 2 if args.t is None else args.t
    start = time.perf_counter()
    if args.interpolate is None:
        # one batch; the grid holds each input beside its reconstruction
        check_request(len(x0), args.seed, model, kept=2 * len(x0), batch=len(x0),
                      what=f"reconstructing {len(x0)} images in one batch")
        x = paper.reconstruct(model, x0, t, seed=args.seed, options=options)
        rows, what = torch.stack([x0, x], 1), f"{len(x)} reconstructions from x_{t}"
    else:
        if args.interpolate < 2:
            raise UserError(f"--interpolate needs at least 2 weights (0 and 1), got {args.interpolate}")
        pairs = len(x0) // 2
        if pairs == 0:
            raise UserError(f"--interpolate needs at least 2 images; {args.source} gave {len(x0)}")
        # the pairs in one batch per weight; the mixes, and the grid's rows of them, kept
        check_request(pairs, args.seed, model, kept=2 * pairs * (args.interpolate + 2), batch=pairs,
                      what=f"--interpolate {args.interpolate} of {pairs} pairs")
        a, b = x0[0:2 * pairs:2], x0[1:2 * pairs:2]
        lambdas = torch.linspace(0, 1, args.interpolate).tolist()
        x = paper.interpolate(model, a, b, lambdas, t, seed=args.seed, options=options).transpose(0, 1)
        rows = torch.cat([a[:, None], x, b[:, None]], 1)
        x, what = x.flatten(0, 1), f"{pairs} interpolations × {args.interpolate} from x_{t}"
    elapsed = time.perf_counter() - start
    if fmt == "png":  # a row per image or pair, the inputs beside what became of them
        images.save(rows.flatten(0, 1), args.out, nrow=rows.shape[1])
    else:
        images.save(x, args.out)
    print(f"wrote {what} to {args.out} ({elapsed:.1f} s)", file=sys.stderr)
    return 0
