"""`fastddpm sample`: draw images from a model and write a PNG grid, an .npz or a folder.

Besides plain sampling, the paper's other uses of the reverse process (§4.3, fastddpm.paper):
`--progressive K` (Fig. 6), `--from IMAGES [--t T]` reconstruction from x_t (Fig. 7) and
`--from IMAGES --interpolate K` (Fig. 8)."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import data, images, paper
from .backends import BACKENDS
from .errors import UserError
from .runtime import DTYPES, check_request, sample
from .samplers import SAMPLERS, SPACINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="model file (.pt / .safetensors), a diffusers model or pipeline folder, an "
                        "original DDPM state dict, or 'default' for the bundled digits model")
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's T)")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1] (0: deterministic)")
    p.add_argument("--spacing", default="leading", choices=SPACINGS,
                   help="timestep spacing when steps < T")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x0 to [-1, 1] (default: the model's setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default ≤ 256)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="how ε is computed")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--no-cuda-graph", action="store_true", help="run the step loop eagerly on CUDA")
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


def run(args: argparse.Namespace) -> int:
    fmt = images.check_output(args.out)  # fail before minutes of sampling, not after
    if args.progressive is not None and args.source is not None:
        raise UserError("--progressive draws from noise; drop --from (or --progressive)")
    if args.source is None and (args.t is not None or args.interpolate is not None):
        raise UserError("--t and --interpolate start from images: add --from IMAGES")
    if args.progressive is not None:
        return _progressive(args, fmt)
    if args.source is not None:
        return _from_images(args, fmt)
    start = time.perf_counter()
    x = sample(args.model, num=args.num, steps=args.steps, sampler=args.sampler, eta=args.eta,
               seed=args.seed, device=args.device, batch_size=args.batch_size,
               progress=not args.no_progress, spacing=args.spacing, clip=args.clip,
               backend=args.backend, dtype=args.dtype, cuda_graph=not args.no_cuda_graph)
    elapsed = time.perf_counter() - start
    images.save(x, args.out)
    print(f"wrote {len(x)} images to {args.out} ({elapsed:.1f} s, {len(x) / elapsed:.2f} img/s)",
          file=sys.stderr)
    return 0


def _progressive(args: argparse.Namespace, fmt: str) -> int:
    if fmt != "png":
        raise UserError("--progressive draws a PNG grid (a row per image, a column per snapshot); "
                        "end --out in .png")
    if args.batch_size is not None:
        raise UserError("--progressive draws its --num images in one batch; drop --batch-size")
    frames = paper.progressive(args.model, num=args.num, snapshots=args.progressive,
                               steps=args.steps, sampler=args.sampler, seed=args.seed,
                               device=args.device, eta=args.eta, spacing=args.spacing,
                               clip=args.clip, backend=args.backend, dtype=args.dtype,
                               cuda_graph=not args.no_cuda_graph)
    images.save(frames.transpose(0, 1).flatten(0, 1), args.out, nrow=args.progressive)
    print(f"wrote {args.num} images × {args.progressive} snapshots to {args.out}", file=sys.stderr)
    return 0


def _from_images(args: argparse.Namespace, fmt: str) -> int:
    """Reconstruction (Fig. 7) or, with --interpolate, interpolation (Fig. 8) of --from images."""
    if args.batch_size is not None:
        raise UserError("--from decodes its images in one batch; drop --batch-size")
    from .checkpoint import load

    model = load(args.model)
    cfg = model.config
    check_request(args.num, args.seed, args.dtype)
    x0 = data.images(args.source, cfg.image_size, cfg.in_channels)[:args.num]
    t = model.schedule.num_timesteps // 2 if args.t is None else args.t
    options = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, spacing=args.spacing,
                   clip=args.clip, device=args.device, backend=args.backend, dtype=args.dtype,
                   cuda_graph=not args.no_cuda_graph)
    start = time.perf_counter()
    if args.interpolate is None:
        x = paper.reconstruct(model, x0, t, seed=args.seed, **options)
        rows, what = torch.stack([x0, x], 1), f"{len(x)} reconstructions from x_{t}"
    else:
        if args.interpolate < 2:
            raise UserError(f"--interpolate needs at least 2 weights (0 and 1), got {args.interpolate}")
        pairs = len(x0) // 2
        if pairs == 0:
            raise UserError(f"--interpolate needs at least 2 images; {args.source} gave {len(x0)}")
        a, b = x0[0:2 * pairs:2], x0[1:2 * pairs:2]
        lambdas = torch.linspace(0, 1, args.interpolate).tolist()
        x = paper.interpolate(model, a, b, lambdas, t, seed=args.seed, **options).transpose(0, 1)
        rows = torch.cat([a[:, None], x, b[:, None]], 1)
        x, what = x.flatten(0, 1), f"{pairs} interpolations × {args.interpolate} from x_{t}"
    elapsed = time.perf_counter() - start
    if fmt == "png":  # a row per image or pair, the inputs beside what became of them
        images.save(rows.flatten(0, 1), args.out, nrow=rows.shape[1])
    else:
        images.save(x, args.out)
    print(f"wrote {what} to {args.out} ({elapsed:.1f} s)", file=sys.stderr)
    return 0
