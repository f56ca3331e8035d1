"""Backends for the ε-model: each turns a DiffusionModel into `denoise(x, t) -> ε` on a device.

The reverse step is always our kernel; only ε changes between backends, so one device gives the
same noise sequence on every backend. Backends register here by name.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .errors import UserError
from .model import DiffusionModel

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
# backends whose ε call can be captured inside the sampler's CUDA graph (ONNX Runtime and
# TensorRT run on streams of their own, outside torch's capture)
GRAPH_CAPTURABLE = ("torch", "compile")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` → the GPU if there is one, else the CPU; a device this machine lacks → UserError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{device} does not exist: this machine has "
                            f"{torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"device {device.type!r} is not supported; use cpu or cuda[:N]")
    return device


def make_denoiser(model: DiffusionModel, backend: str, device: torch.device,
                  dtype: torch.dtype) -> Denoiser:
    """ε-model callable for `backend` ('torch': eager; 'compile': torch.compile'd)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("onnxruntime", "tensorrt"):  # imported here: ONNX and TensorRT are optional
        from .export import require_onnx_export

        require_onnx_export(f"the {backend} backend")  # it runs our ONNX export of the model
        from .export.backend import make_export_denoiser

        return make_export_denoiser(model, backend, device, dtype)
    unet = model.unet
    if next(unet.parameters()).dtype != dtype:
        unet = copy.deepcopy(unet)  # casting in place would round the caller's weights for good
    unet = unet.to(device=device, dtype=dtype).eval()
    if backend == "compile":
        # the default mode: no CUDA graphs of inductor's own (ours wraps the whole step), and no
        # max-autotune — 88 % of the U-Net's FLOPs are 3×3 convolutions, which stay with cuDNN,
        # while autotuning the rest would cost minutes per batch size
        unet = torch.compile(unet, fullgraph=True)

    @torch.inference_mode()
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t)

    return denoise
