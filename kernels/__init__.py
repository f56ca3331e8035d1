"""Fused kernels beside their plain-torch references (installed as fastddpm.kernels).

- `reverse_step(x, eps, coef, step, rng, history, clip)`: every sampler's update, one launch
  per step, noise drawn in the kernel, the x̂0 of earlier steps in a ring (`new_history`)
  (torch op `fastddpm::reverse_step`).
- `group_norm_silu(x, weight, bias, groups, eps, bias_nc, silu)`: GroupNorm (+ time-embedding
  bias, + SiLU) for the U-Net (torch op `fastddpm::group_norm_silu`).
- `gaussian(...)`: the noise both draw, as a reference (kernels.noise).

Each runs its Triton kernel on CUDA tensors and its reference elsewhere; `mode="reference"`
forces the reference (see kernels.dispatch). Tracing for ONNX export sets that mode on the
traced U-Net, so the graph holds standard ops instead of `fastddpm::` custom ops:

    unet.set_kernels("reference")
    torch.onnx.export(unet, (x, t), "unet.onnx", ...)
"""
from .dispatch import HAS_TRITON, KERNEL_MODES
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .noise import gaussian
from .reverse_step import new_history, reverse_step, reverse_step_reference

__all__ = ["HAS_TRITON", "KERNEL_MODES", "gaussian", "group_norm_silu", "group_norm_silu_reference",
           "new_history", "reverse_step", "reverse_step_reference"]
