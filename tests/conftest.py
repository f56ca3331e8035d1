"""Triton kernels run under the numpy interpreter (TRITON_INTERPRET=1) on machines without a
CUDA device. Set here, before any test module imports triton: `triton.jit` reads the variable
when a kernel is defined, so setting it later has no effect."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
