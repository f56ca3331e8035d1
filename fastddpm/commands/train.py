"""`fastddpm train`: the command line of the reference trainer (fastddpm/train.py)."""
from __future__ import annotations

import argparse

from ..train import PRECISIONS, TrainConfig, Trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--data", default=d.data, help="'digits', a folder of images, a CIFAR-10 python "
                                                  "folder, or an .npz (default: digits)")
    p.add_argument("--out", default=d.out, help="run folder (default: %(default)s)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--config", default=None, help="named U-Net config (default: digits)")
    arch.add_argument("--unet-json", default=None, help="JSON file of U-Net config fields")
    p.add_argument("--steps", type=int, default=d.steps, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="per process (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak LR (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="linear LR warm-up steps (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="EMA decay, reached after a warm-up (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="max gradient norm (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=None, help="overrides the config's")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--precision", default=d.precision, choices=list(PRECISIONS),
                   help="autocast dtype (fp16: GPU only; default: %(default)s)")
    p.add_argument("--sample-every", type=int, default=d.sample_every,
                   help="steps between sample grids, 0: never (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="(default: %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")


def run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    Trainer(TrainConfig(**fields)).run()
    return 0
