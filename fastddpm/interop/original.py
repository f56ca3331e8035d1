"""Bare state dicts in the layout of the PyTorch port of the original DDPM TF checkpoints
(keys `temb.dense.0.weight`, `down.0.block.0.norm1.weight`, `mid.attn_1.q.weight`, ...).

Those files hold weights only, so the config is read off the weight shapes. The image size is
not in them: the released models (CIFAR-10 32², LSUN and CelebA-HQ 256²) all put attention at
16×16, so the size is 16 · 2^(first attention level). Schedule and sampling defaults are the
paper's: linear β 1e-4 → 0.02 over T = 1000, x̂0 clipped, σ² = β at 32² (CIFAR-10) and β̃ at 256².
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..model import DiffusionModel, SamplingDefaults
from ..schedule import ScheduleConfig
from ..unet import UNetConfig
from .names import ORIGINAL, our_shapes, param_map, to_ours

MARKER = "temb.dense.0.weight"  # a key only this layout has
ATTENTION_RESOLUTION = 16  # where every released original model attends


def _weight(state: dict, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{where}: missing weight {key!r}")
    return state[key]


def infer_config(state: dict[str, torch.Tensor], where: str) -> UNetConfig:
    """The U-Net config these weights were trained with, from their shapes."""
    conv_in = _weight(state, "conv_in.weight", where)
    conv_out = _weight(state, "conv_out.weight", where)
    base = conv_in.shape[0]
    widths = []
    while f"down.{len(widths)}.block.0.conv1.weight" in state:
        widths.append(state[f"down.{len(widths)}.block.0.conv1.weight"].shape[0])
    if not widths:
        raise UserError(f"{where}: missing weight 'down.0.block.0.conv1.weight'")
    if any(w % base for w in widths):
        raise UserError(f"{where}: level widths {widths} are not multiples of conv_in's {base}")
    num_blocks = 0
    while f"down.0.block.{num_blocks}.conv1.weight" in state:
        num_blocks += 1
    attn_levels = [i for i in range(len(widths)) if f"down.{i}.attn.0.q.weight" in state]
    if not attn_levels:
        raise UserError(f"{where}: no attention level, so the image size cannot be inferred "
                        f"(the original models attend at {ATTENTION_RESOLUTION}×{ATTENTION_RESOLUTION})")
    size = ATTENTION_RESOLUTION * 2 ** attn_levels[0]
    return UNetConfig(image_size=size, in_channels=conv_in.shape[1], out_channels=conv_out.shape[0],
                      base_channels=base, channel_mult=tuple(w // base for w in widths),
                      num_res_blocks=num_blocks,
                      attn_resolutions=tuple(size // 2**i for i in attn_levels),
                      dropout=0.1 if size == 32 else 0.0,  # the paper's; inert when sampling
                      groups=32, eps=1e-6)  # the original's GroupNorm


def from_original_state_dict(state: dict[str, torch.Tensor], where: str) -> DiffusionModel:
    cfg = infer_config(state, where)
    shapes = our_shapes(cfg)
    ours = to_ours(state, param_map(shapes, ORIGINAL, len(cfg.channel_mult)), shapes, where)
    sampling = SamplingDefaults("fixed_large" if cfg.image_size == 32 else "fixed_small", clip=True)
    return DiffusionModel.from_weights(cfg, ScheduleConfig(), sampling, ours, where)
