"""Fused kernels beside their plain-torch references (installed as fastddpm.kernels)."""
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .noise import gaussian
from .reverse_step import reverse_step, reverse_step_reference

__all__ = ["gaussian", "group_norm_silu", "group_norm_silu_reference", "reverse_step",
           "reverse_step_reference"]
