"""`fastddpm train`: the command line of the reference trainer (fastddpm/train.py).

No flag has a parser default: the defaults are TrainConfig's, so with --resume a flag left out
takes the resumed run's value (and a given one that differs is refused), never the default's."""
from __future__ import annotations

import argparse

from ..train import PRECISIONS, TrainConfig, Trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.argument_default = argparse.SUPPRESS
    p.add_argument("--data", help="'digits', a folder of images, a CIFAR-10 python folder, or an .npz "
                                  f"(default: {d.data})")
    p.add_argument("--out", help=f"run folder (default: {d.out})")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--config", help="named U-Net config (default: digits)")
    arch.add_argument("--unet-json", help="JSON file of U-Net config fields")
    p.add_argument("--steps", type=int, help=f"(default: {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"per process (default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"AdamW peak LR (default: {d.lr})")
    p.add_argument("--warmup", type=int, help=f"linear LR warm-up steps (default: {d.warmup})")
    p.add_argument("--ema-decay", type=float,
                   help=f"EMA decay, reached after a warm-up (default: {d.ema_decay})")
    p.add_argument("--grad-clip", type=float, help=f"max gradient norm (default: {d.grad_clip})")
    p.add_argument("--dropout", type=float, help="overrides the config's")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help=f"autocast dtype (fp16: GPU only; default: {d.precision})")
    p.add_argument("--sample-every", type=int,
                   help=f"steps between sample grids, 0: never (default: {d.sample_every})")
    p.add_argument("--save-every", type=int, help=f"(default: {d.save_every})")
    p.add_argument("--log-every", type=int, help=f"(default: {d.log_every})")
    p.add_argument("--seed", type=int, help=f"(default: {d.seed})")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly: flags left out take the run's values, "
                        "and only --steps, --device and the --*-every flags may change")


def run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    Trainer(TrainConfig(**given), given=set(given)).run()
    return 0
