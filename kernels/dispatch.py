"""When the fused Triton kernels run, and when the plain-torch references do.

The fused path runs for CUDA tensors of a dtype the kernels handle (fp32/fp16/bf16) when Triton
is importable, outside `use_reference()` and outside autograd (training differentiates through
the references; the kernels have no backward). Everything else — CPU tensors, float64, tracing
for ONNX export, a machine without Triton — takes the reference.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references serve
    HAS_TRITON = False

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_DEVICES = ("cuda",)  # where the custom ops are called (tests add "cpu" to reach the ops)

# A plain module counter, not a ContextVar: dynamo cannot trace ContextVar.get(), and the U-Net
# is compiled with fullgraph=True. Not thread-local — export traces on one thread.
_force_reference_depth = 0


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Run the plain-torch references inside this block (ONNX export traces standard ops)."""
    global _force_reference_depth
    _force_reference_depth += 1
    try:
        yield
    finally:
        _force_reference_depth -= 1


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can take x here (device, dtype, Triton present)."""
    return HAS_TRITON and x.device.type == "cuda" and x.dtype in FUSED_DTYPES


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernels serve tensors on `device` here and now."""
    return HAS_TRITON and device.type in FUSED_DEVICES and _force_reference_depth == 0


def use_fused(*tensors: torch.Tensor | None) -> bool:
    """The fused op for these tensors (the first is the activation), or the reference?"""
    present = [t for t in tensors if t is not None]
    if not fused_available(present[0].device) or present[0].dtype not in FUSED_DTYPES:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def dense_layout(x: torch.Tensor) -> torch.memory_format:
    """The dense layout a kernel walks x in: NHWC only for a 4-D x that is channels_last and not
    also plain contiguous (C = 1 or H·W = 1 make the two the same)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
