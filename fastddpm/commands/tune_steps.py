"""`fastddpm tune-steps MODEL --steps N [--sampler S] [--calib 256] [--seed 0] [--out FILE]`.

Searches the N timesteps at which sampler S best follows a fine DDIM trajectory from the same
x_T (fastddpm.tuning) and stores them in the model's sampling defaults, where `--spacing tuned`
(and the default spacing) finds them. The model file is rewritten atomically, and only once the
search has finished; MODEL stays as it was on any error or interruption.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import DEFAULT_NAME, default_model_path, load, save
from ..errors import UserError
from ..files import check_writable_target
from ..model import DiffusionModel
from ..options import DEFAULT_SAMPLER, SamplingOptions
from ..samplers import SAMPLERS
from ..tuning import check_request, tune_grid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file, or 'default' (the bundled model, rewritten in place)")
    p.add_argument("--steps", type=int, required=True, help="the grid's number of steps (ε evaluations)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"a deterministic sampler: one of {', '.join(SAMPLERS)} but ddpm "
                        "(default: %(default)s)")
    p.add_argument("--calib", type=int, default=256, help="calibration draws (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draws (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="write the model with its grid here (.pt or .safetensors; default: MODEL itself)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")


def run(args: argparse.Namespace) -> int:
    source = default_model_path() if args.model == DEFAULT_NAME else Path(args.model)
    if args.out is None and source.is_dir():
        raise UserError(f"{source} is a folder; give --out FILE (.pt or .safetensors) for the tuned model")
    out = check_writable_target(args.out or source)
    model = load(args.model)
    check_request(model, args.sampler, args.steps, args.calib)  # before any sampling
    # PyTorch in fp32 whatever is installed: the same grid from the same seed on every machine
    options = SamplingOptions(device=args.device, backend="torch", dtype="fp32")
    result = tune_grid(model, args.sampler, args.steps, args.calib, args.seed, options,
                       report=lambda line: print(line, file=sys.stderr, flush=True))
    tuned = DiffusionModel(model.unet, model.schedule,
                           model.sampling.with_grid(args.sampler, args.steps, result.timesteps))
    save(tuned, out)
    starts = ", ".join(f"{name} {e:.3g}" for name, e in result.start_errors.items())
    print(f"wrote {out}: {args.sampler} at {args.steps} steps on {list(result.timesteps)}, squared "
          f"distance to the reference {result.error:.3g} (from {starts}; {result.evaluations} runs); "
          f"sample with --sampler {args.sampler} --steps {args.steps} --spacing tuned", file=sys.stderr)
    return 0
