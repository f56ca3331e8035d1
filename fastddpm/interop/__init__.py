"""Models from elsewhere: diffusers folders (both directions) and the original DDPM checkpoints.

    load_folder(dir)            a diffusers UNet2DModel / pipeline / flat google/ddpm-* folder
    from_state_dict(sd, where)  a bare state dict (the original checkpoints' PyTorch port)
    save_folder(model, dir)     a folder diffusers' UNet2DModel and DDPMPipeline both load
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..model import DiffusionModel
from .diffusers import load_folder, save_folder
from .original import MARKER as ORIGINAL_MARKER
from .original import from_original_state_dict

__all__ = ["from_state_dict", "load_folder", "save_folder"]


def from_state_dict(state: dict[str, torch.Tensor], where: str) -> DiffusionModel:
    """A model from a state dict that carries no config: its layout is told by its keys."""
    if ORIGINAL_MARKER in state:
        return from_original_state_dict(state, where)
    if "time_embedding.linear_1.weight" in state:
        raise UserError(f"{where} is a bare diffusers state dict; pass the folder that holds it "
                        "with its config.json")
    if "time_embed.0.weight" in state:
        raise UserError(f"{where} is a bare fastddpm state dict without its config; save models "
                        "with fastddpm.save")
    raise UserError(f"{where} is a state dict in no layout fastddpm knows "
                    f"(first key {next(iter(state))!r}); see `fastddpm convert --help`")
