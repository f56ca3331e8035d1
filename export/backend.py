"""The onnxruntime and tensorrt ε backends of the sampler, registered with fastddpm.backends
through entry points (pyproject.toml): the model's ε graph is exported into a temp folder
(validated, as every export is) and run by the engine's runner on torch buffers."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fastddpm.backends import Backend
from fastddpm.dtypes import dtype_name
from fastddpm.model import DiffusionModel
from fastddpm.options import MAX_BATCH

from . import require_onnx_export


def _export_denoiser(model: DiffusionModel, engine: str, device: torch.device, dtype: torch.dtype,
                     threads: int):
    """`denoise(x, t)` over the model's ε graph, exported now into a temp folder and validated."""
    require_onnx_export(f"the {engine} backend")  # it runs our ONNX export of the model
    from .onnx import OnnxOptions, export_onnx

    workdir = tempfile.TemporaryDirectory(prefix="fastddpm-")
    onnx_path = Path(workdir.name) / "eps.onnx"
    export_onnx(model, onnx_path, OnnxOptions(dtype=dtype_name(dtype), what="eps"), log=None)
    if engine == "tensorrt":
        from .tensorrt import TensorRTRunner, build_engine

        plan = Path(workdir.name) / "eps.plan"
        build_engine(onnx_path, plan, batch_range=(1, MAX_BATCH))
        runner = TensorRTRunner(plan, device)
    else:
        from .runners import OrtRunner

        runner = OrtRunner(onnx_path, device, threads)

    @torch.inference_mode()
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return runner(x=x, t=t)["eps"].to(x.device)

    denoise.workdir = workdir  # the artifacts live as long as the denoiser
    denoise.runner = runner  # its session (threads, providers) for callers and tests
    return denoise


ONNXRUNTIME = Backend("onnxruntime", lambda m, d, t, n: _export_denoiser(m, "onnxruntime", d, t, n))
TENSORRT = Backend("tensorrt", lambda m, d, t, n: _export_denoiser(m, "tensorrt", d, t, n))
