"""When the fused Triton kernels run, and when the plain-torch references do — chosen per call
by an explicit `mode`, never by process-wide state:

- "auto" (the default): the torch op, whose body is the Triton kernel, for CUDA tensors of a
  dtype the kernels handle (fp32/fp16/bf16) when Triton is importable; the reference elsewhere
  (CPU tensors, float64, a machine without Triton);
- "reference": always the plain-torch reference (ONNX export traces standard ops);
- "op": always the torch op where Triton is importable (its CPU kernel is the reference), which
  is how a CPU reaches the op's wiring.

With autograd recording through any input the reference runs in every mode: training
differentiates through it, the kernels have no backward. The U-Net holds its mode on its norm
layers (`UNet.set_kernels`), so a traced or compiled copy carries its own.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references serve
    HAS_TRITON = False

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MODES = ("auto", "reference", "op")


def check_mode(mode: str) -> None:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can take x here (device, dtype, Triton present)."""
    return HAS_TRITON and x.device.type == "cuda" and x.dtype in FUSED_DTYPES


def use_fused(mode: str, *tensors: torch.Tensor | None) -> bool:
    """The torch op for these tensors (the first is the activation), or the reference?"""
    check_mode(mode)
    present = [t for t in tensors if t is not None]
    if mode == "reference" or not HAS_TRITON:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if mode == "op":  # the op's CPU kernel is the reference; on CUDA only dtypes it handles
        return present[0].device.type != "cuda" or present[0].dtype in FUSED_DTYPES
    return kernel_applies(present[0])


class LazyOp:
    """`fastddpm::<name>`, registered by `register` on first use. Why not at import: registering a
    triton_op makes torch read its body for Triton kernels, which imports torch._inductor — a
    second of every cold start, which sampling on the CPU never needs (and a CUDA build of torch
    brings Triton to CPU-only machines too). Where a CUDA device is present it is registered at
    once, so code that torch.compile traces, which cannot register an op, always finds it."""

    def __init__(self, name: str, register: Callable[[], None]):
        self.name, self.register, self.registered = name, register, False
        if torch.cuda.is_available():
            self()

    def __call__(self):
        if not self.registered:
            self.register()
            self.registered = True
        return getattr(torch.ops.fastddpm, self.name)


def dense_layout(x: torch.Tensor) -> torch.memory_format:
    """The dense layout a kernel walks x in: NHWC only for a 4-D x that is channels_last and not
    also plain contiguous (C = 1 or H·W = 1 make the two the same)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
