"""The onnxruntime and tensorrt ε backends of the sampler, registered with fastddpm.backends
through entry points (pyproject.toml): the model's ε graph is exported (validated, as every
export is) into the disk cache (fastddpm.disk_cache; a temp folder where it cannot be written)
and run by the engine's runner on torch buffers."""
from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from fastddpm import __version__, disk_cache
from fastddpm.backends import Backend
from fastddpm.dtypes import dtype_name
from fastddpm.model import DiffusionModel
from fastddpm.options import MAX_BATCH
from fastddpm.sessions import model_hash

from . import require_onnx_export


def _eps_onnx(model: DiffusionModel, dtype: torch.dtype, workdir: Path) -> Path:
    """The model's ε graph in `dtype` as an ONNX file: from the disk cache (exported and validated
    into it on a miss), or exported into `workdir` where the cache cannot be written."""
    def write(folder: Path) -> None:
        # imported on a miss only: onnx takes ~0.7 s to import (measured), which a start with a
        # warm cache would pay for nothing
        from .onnx import OnnxOptions, export_onnx

        export_onnx(model, folder / "eps.onnx", OnnxOptions(dtype=dtype_name(dtype), what="eps"), log=None)

    key = {"model": model_hash(model), "dtype": dtype_name(dtype), "torch": torch.__version__,
           "onnx": version("onnx"), "fastddpm": __version__}
    folder = disk_cache.load("onnx", key) or disk_cache.store("onnx", key, write)
    if folder is None:
        write(workdir)
        folder = workdir
    return folder / "eps.onnx"


def _export_denoiser(model: DiffusionModel, engine: str, device: torch.device, dtype: torch.dtype,
                     threads: int):
    """`denoise(x, t)` over the model's ε graph (exported and validated, or read from the cache)."""
    require_onnx_export(f"the {engine} backend")  # it runs our ONNX export of the model
    workdir = tempfile.TemporaryDirectory(prefix="fastddpm-")
    onnx_path = _eps_onnx(model, dtype, Path(workdir.name))
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
