"""`fastddpm convert SRC [-o OUT] [--to fastddpm|diffusers]`: models in and out of our format.

SRC is anything `fastddpm.load` reads: a model file, `default` (the bundled model), a diffusers
UNet2DModel / pipeline / flat google/ddpm-* folder, or a bare state dict of the original DDPM
checkpoints' PyTorch port. `--to fastddpm` writes a model file (.pt, or .safetensors by suffix);
`--to diffusers` writes a folder that diffusers' UNet2DModel and DDPMPipeline load.
"""
from __future__ import annotations

import argparse
import sys

from ..checkpoint import load, save
from ..files import check_writable_folder_target, check_writable_target, refuse_overwriting_inputs
from ..interop import save_folder

TARGETS = ("fastddpm", "diffusers")
DEFAULT_OUT = {"fastddpm": "model.pt", "diffusers": "model-diffusers"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="model file, 'default', diffusers folder, or original DDPM state dict")
    p.add_argument("-o", "--out", default=None,
                   help="output: a .pt / .safetensors file for fastddpm, a folder for diffusers "
                        f"(default {DEFAULT_OUT['fastddpm']} / {DEFAULT_OUT['diffusers']})")
    p.add_argument("--to", default="fastddpm", choices=TARGETS, help="output format")


def run(args: argparse.Namespace) -> int:
    out = args.out or DEFAULT_OUT[args.to]
    # fail on a bad output path before reading (and building) a possibly large model
    refuse_overwriting_inputs(out, args.src)
    if args.to == "diffusers":
        check_writable_folder_target(out)
    else:
        check_writable_target(out)
    model = load(args.src)
    if args.to == "diffusers":
        save_folder(model, out)
    else:
        save(model, out)
    params = sum(p.numel() for p in model.unet.parameters())
    cfg = model.config
    print(f"wrote {out} ({args.to}: {cfg.image_size}² U-Net, {params:,} parameters, "
          f"{model.schedule.num_timesteps} steps, {model.sampling.variance})", file=sys.stderr)
    return 0
