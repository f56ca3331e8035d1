"""The onnxruntime and tensorrt ε backends of the sampler: the model's ε graph is exported into a
temp folder (validated, as every export is) and run by the engine's runner on torch buffers."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fastddpm.model import DiffusionModel
from fastddpm.runtime import DTYPES

from .onnx import OnnxOptions, export_onnx
from .runners import OrtRunner
from .tensorrt import TensorRTRunner, build_engine


def make_export_denoiser(model: DiffusionModel, backend: str, device: torch.device,
                         dtype: torch.dtype):
    """`denoise(x, t)` over the model's ε graph, exported now into a temp folder and validated."""
    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
    workdir = tempfile.TemporaryDirectory(prefix="fastddpm-")
    onnx_path = Path(workdir.name) / "eps.onnx"
    export_onnx(model, onnx_path, OnnxOptions(dtype=dtype_name, what="eps"), log=None)
    if backend == "tensorrt":
        plan = Path(workdir.name) / "eps.plan"
        build_engine(onnx_path, plan, batch_range=(1, 256))
        runner = TensorRTRunner(plan, device)
    else:
        runner = OrtRunner(onnx_path, device)

    @torch.inference_mode()
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return runner(x=x, t=t)["eps"].to(x.device)

    denoise.workdir = workdir  # the artifacts live as long as the denoiser
    return denoise
