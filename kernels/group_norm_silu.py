"""GroupNorm with an optional per-(sample, channel) bias added first and an optional SiLU after.

    h = x + bias_nc[:, :, None, None]                         (if bias_nc is given)
    y = (h − mean_g) / √(var_g + eps) · weight_c + bias_c     (statistics per sample and group)
    y = y · sigmoid(y)                                        (if silu)

Statistics in float32 (float64 in the reference when given float64), I/O in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              groups: int, eps: float, bias_nc: torch.Tensor | None = None,
                              silu: bool = True) -> torch.Tensor:
    """Plain torch. x: (N, C, *spatial); weight, bias: (C,); bias_nc: (N, C) or None."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(dtype)
    if bias_nc is not None:
        h = h + bias_nc.to(dtype).view(*bias_nc.shape, *([1] * (x.ndim - 2)))
    y = F.group_norm(h, groups, weight.to(dtype), bias.to(dtype), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                    eps: float, bias_nc: torch.Tensor | None = None,
                    silu: bool = True) -> torch.Tensor:
    """The fused op the U-Net calls for every GroupNorm (→ SiLU)."""
    return group_norm_silu_reference(x, weight, bias, groups, eps, bias_nc, silu)
