"""When the fused Triton kernels run, and when the plain-torch references do.

The fused path runs for CUDA tensors when Triton is importable, outside `use_reference()` and
outside autograd (training differentiates through the references). Everything else — CPU
tensors, tracing for ONNX export, a machine without Triton — takes the reference.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references serve
    HAS_TRITON = False

_force_reference = contextvars.ContextVar("fastddpm_force_reference", default=False)


@contextlib.contextmanager
def use_reference():
    """Run the plain-torch references inside this block (ONNX export traces standard ops)."""
    token = _force_reference.set(True)
    try:
        yield
    finally:
        _force_reference.reset(token)


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernels serve tensors on `device` here and now."""
    return HAS_TRITON and device.type == "cuda" and not _force_reference.get()


def use_fused(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    if not fused_available(present[0].device):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
