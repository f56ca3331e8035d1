"""`fastddpm sample`: draw images from a model and write a PNG grid, an .npz or a folder."""
from __future__ import annotations

import argparse
import sys
import time

from . import images, paper
from .backends import BACKENDS
from .errors import UserError
from .runtime import DTYPES, sample
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


def run(args: argparse.Namespace) -> int:
    fmt = images.check_output(args.out)  # fail before minutes of sampling, not after
    if args.progressive is not None:
        return _progressive(args, fmt)
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
