"""The dtypes a user names (fp32 / fp16 / bf16, and `auto` for sampling) and the quantizations
(int8): one table for every command and engine."""
from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# what sampling's --dtype takes: auto resolves per device and backend (SamplingOptions.torch_dtype)
SAMPLING_DTYPES = ("auto", *DTYPES)
# of the ε-model inside its engine (--quantize); the sampler's tensors stay in the dtype above
QUANTIZATIONS = ("int8",)


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' → torch.float32; an unknown name is a one-line UserError."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 → 'fp32'."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} is not one of fastddpm's dtypes ({', '.join(DTYPES)})")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86's AVX512-BF16 or AMX), as torch's own
    cpuinfo check sees it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
