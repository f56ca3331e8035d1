"""What the kernel tests share: devices, tolerances, poisoned outputs, a comparison that says
how many elements differ, where, and whether NaN appeared."""
from __future__ import annotations

import os

import pytest
import torch

from fastddpm.kernels.dispatch import HAS_TRITON

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# kernel vs reference, both computing in fp32 and rounding once to the I/O dtype: fp32 allows a
# few ulp of reordered arithmetic; fp16 / bf16 allow one rounding flip of the output (2^-11, 2^-8)
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# "cpu": the kernels under the interpreter (CI); "cuda": compiled, on a GPU machine (`-m gpu`)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="kernels take CPU tensors only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda]),
]


def dtypes_for(device: str) -> list[torch.dtype]:
    """The interpreter (numpy) has no bfloat16."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer shaped and laid out like `like`, full of NaN: an element the kernel
    forgets to write shows up as NaN."""
    return torch.full_like(like, float("nan"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None) -> None:
    """allclose with the dtype's tolerances; on failure says how many differ, the first few
    indices and values, the largest difference, and how many NaN the actual holds."""
    tol_atol, tol_rtol = TOLERANCES[dtype or actual.dtype]
    atol = tol_atol if atol is None else atol
    rtol = tol_rtol if rtol is None else rtol
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol) | a.isnan()
    if not bad.any():
        return
    where = bad.nonzero()[:5].tolist()
    shown = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}"
                      for i in where)
    finite = ~(a.isnan() | e.isnan())
    worst = (a - e).abs()[finite].max().item() if finite.any() else float("nan")
    raise AssertionError(
        f"{int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"NaN in actual: {int(a.isnan().sum())}; max |diff| {worst:.3g}; first: {shown}")
