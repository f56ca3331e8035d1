"""ε engines by name: each turns a DiffusionModel into `denoise(x, t) -> ε` on a device.

The reverse step is always our kernel; only ε changes between backends, so one device gives the
same noise sequence on every backend. `torch` and `compile` live here; other engines plug in
through the `fastddpm.backends` entry-point group (fastddpm.export declares onnxruntime and
tensorrt in pyproject.toml), so the core never imports them: an entry point is loaded only when
its backend is asked for.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

import torch

from .errors import UserError

if TYPE_CHECKING:
    from .model import DiffusionModel

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENTRY_POINT_GROUP = "fastddpm.backends"


@dataclass(frozen=True)
class Backend:
    name: str
    # make(model, device, dtype, threads): threads is the one CPU thread count the engine uses;
    # a backend with quantizations also takes quantize= (one of them) where one is asked for
    make: Callable[..., Denoiser]
    # whether its ε call can be captured inside the sampler's CUDA graph (ONNX Runtime and
    # TensorRT run on streams of their own, outside torch's capture)
    graph_capturable: bool = False
    quantizations: tuple[str, ...] = ()  # what --quantize it runs (openvino: int8)
    # whether --dtype auto runs it (and auto, where it is a candidate) in bf16 on a CPU with native
    # bf16: only where that was measured faster in every case (README, "CPU engines"); torch's CPU
    # bf16 is not (the bundled model at batch 1: 5.9 against 3.5 ms a forward), ONNX Runtime's CPU
    # provider has no bf16 kernels
    bf16_when_auto: bool = False


_registry: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _registry[backend.name] = backend
    return backend


@functools.cache
def _plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> tuple[str, ...]:
    """Every backend this install knows, registered or declared (declared ones are not loaded)."""
    return tuple(dict.fromkeys([*_registry, *_plugins()]))


def get_backend(name: str) -> Backend:
    if name not in _registry and name in _plugins():
        backend = _plugins()[name].load()
        if not isinstance(backend, Backend) or backend.name != name:
            raise TypeError(f"entry point {name!r} of {ENTRY_POINT_GROUP} must name Backend {name!r}")
        register_backend(backend)
    if name not in _registry:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return _registry[name]


def resolve_threads(threads: int | None) -> int:
    """The CPU threads an engine runs on: `threads`, or by default the threads torch uses."""
    return threads if threads is not None else torch.get_num_threads()


def make_denoiser(model: DiffusionModel, backend: str, device: torch.device,
                  dtype: torch.dtype, threads: int | None = None,
                  quantize: str | None = None) -> Denoiser:
    """The ε-model callable of backend `backend` on `device` in `dtype`, on `threads` CPU threads
    (default: torch's count), quantized to `quantize` where one is named."""
    engine = get_backend(backend)
    if quantize is None:
        return engine.make(model, device, dtype, resolve_threads(threads))
    if quantize not in engine.quantizations:
        runs = [name for name in backend_names() if quantize in get_backend(name).quantizations]
        raise UserError(f"the {backend} backend does not run --quantize {quantize}; use "
                        f"--backend {' or '.join(runs)}, or drop --quantize")
    return engine.make(model, device, dtype, resolve_threads(threads), quantize=quantize)


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


def _torch_unet(model: DiffusionModel, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    unet = model.unet
    if next(unet.parameters()).dtype != dtype:
        unet = copy.deepcopy(unet)  # casting in place would round the caller's weights for good
    return unet.to(device=device, dtype=dtype).eval()


def _no_grad(unet: Callable, threads: int) -> Denoiser:
    @torch.inference_mode()
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # torch's pool is process-wide: set per call, as another engine or caller may have moved it
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return unet(x, t)

    return denoise


def _eager(model: DiffusionModel, device: torch.device, dtype: torch.dtype,
           threads: int | None = None) -> Denoiser:
    return _no_grad(_torch_unet(model, device, dtype), resolve_threads(threads))


def _compiled(model: DiffusionModel, device: torch.device, dtype: torch.dtype,
              threads: int | None = None) -> Denoiser:
    # the default mode: no CUDA graphs of inductor's own (ours wraps the whole step), and no
    # max-autotune — 88 % of the U-Net's FLOPs are 3×3 convolutions, which stay with cuDNN,
    # while autotuning the rest would cost minutes per batch size
    return _no_grad(torch.compile(_torch_unet(model, device, dtype), fullgraph=True),
                    resolve_threads(threads))


register_backend(Backend("torch", _eager, graph_capturable=True))
register_backend(Backend("compile", _compiled, graph_capturable=True))
