"""The sampling loop: x_T → x_0 with any sampler table over any ε backend.

Per step: ε = denoise(x, t[step]); x, x̂0 = reverse_step(x, ε, coef, step, rng). `step` and `rng`
live on the device, so on CUDA one step is captured once as a CUDA graph (per batch size) and
replayed for every step with no host work in between: no sync, no allocation, no Python
scheduler. Noise comes from (seed, global sample index, step, element), so a sample's image does
not depend on the batch it was drawn in.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import kernels
from .backends import GRAPH_CAPTURABLE, make_denoiser, resolve_device
from .errors import UserError
from .kernels.noise import INIT_STREAM
from .model import DiffusionModel
from .samplers import SamplerTable

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Buffers:
    """The state one step reads and writes, at fixed addresses (what a CUDA graph needs)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 with_x0_prev: bool):
        self.x = torch.empty(shape, device=device, dtype=dtype)
        self.x0 = torch.empty(shape, device=device, dtype=dtype)
        self.x0_prev = torch.zeros(shape, device=device, dtype=dtype) if with_x0_prev else None
        self.step = torch.zeros(1, device=device, dtype=torch.int64)
        self.rng = torch.zeros(2, device=device, dtype=torch.int64)  # (seed, first sample index)

    def reset(self, x_start: torch.Tensor, seed: int, first: int) -> None:
        self.x.copy_(x_start)
        if self.x0_prev is not None:
            self.x0_prev.zero_()
        self.step.zero_()
        self.rng.copy_(torch.tensor([seed, first], dtype=torch.int64))


class Sampler:
    """Runs one sampler table over one model on one device.

    `sampler.run(seed, first, batch)` returns x_0 (batch, C, H, W) in the model dtype."""

    def __init__(self, model: DiffusionModel, table: SamplerTable, device: torch.device,
                 dtype: torch.dtype = torch.float32, backend: str = "torch",
                 cuda_graph: bool = True):
        self.model = model
        self.table = table
        self.device = device
        self.dtype = dtype
        cfg = model.config
        self.image_shape = (cfg.out_channels, cfg.image_size, cfg.image_size)
        self.denoise = make_denoiser(model, backend, device, dtype)
        self.coef = table.coef.to(device=device, dtype=torch.float32)
        self.timesteps = table.timesteps.to(device)
        self.use_graph = cuda_graph and device.type == "cuda" and backend in GRAPH_CAPTURABLE
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, _Buffers]] = {}

    def _step(self, buf: _Buffers) -> None:
        t = self.timesteps.index_select(0, buf.step).expand(buf.x.shape[0])
        eps = self.denoise(buf.x, t)
        # written in place: x_prev over x, x̂0 into x0 (each element is read before it is written)
        kernels.reverse_step(buf.x, eps, self.coef, buf.step, buf.rng, buf.x0_prev,
                             self.table.clip, out=buf.x, x0_out=buf.x0)
        if buf.x0_prev is not None:
            buf.x0_prev.copy_(buf.x0)
        buf.step.add_(1)

    def _graph_for(self, batch: int, x_T: torch.Tensor, seed: int, first: int):
        if batch not in self._graphs:
            buf = _Buffers((batch, *self.image_shape), self.device, self.dtype,
                           self.table.uses_x0_prev)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: autotuning and lazy init happen here
                buf.reset(x_T, seed, first)
                for _ in range(min(3, self.table.num_steps)):
                    self._step(buf)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(buf)
            self._graphs[batch] = (graph, buf)
        return self._graphs[batch]

    def initial_noise(self, seed: int, first: int, batch: int) -> torch.Tensor:
        index = torch.arange(first, first + batch, device=self.device)
        z = kernels.gaussian(seed, index, 0, self.image_shape, INIT_STREAM, device=self.device)
        return z.to(self.dtype)

    @torch.inference_mode()
    def run(self, seed: int, first: int, batch: int,
            on_step: Callable[[int, torch.Tensor], None] | None = None,
            x_start: torch.Tensor | None = None) -> torch.Tensor:
        """Samples `first .. first+batch−1` of the stream `seed`.

        on_step(i, x̂0) sees every step's predicted x_0 (progressive generation); leave it None
        for the fastest loop. x_start (batch, C, H, W) replaces x_T: a point on the chain at the
        table's first timestep (see `make_table(start=...)`)."""
        if x_start is None:
            x_start = self.initial_noise(seed, first, batch)
        elif tuple(x_start.shape) != (batch, *self.image_shape):
            raise UserError(f"x_start must have shape {(batch, *self.image_shape)}, "
                            f"got {tuple(x_start.shape)}")
        x_start = x_start.to(self.device, self.dtype)
        if self.use_graph:
            graph, buf = self._graph_for(batch, x_start, seed, first)
            buf.reset(x_start, seed, first)
            run_step = graph.replay
        else:
            buf = _Buffers((batch, *self.image_shape), self.device, self.dtype,
                           self.table.uses_x0_prev)
            buf.reset(x_start, seed, first)
            run_step = lambda: self._step(buf)  # noqa: E731
        for i in range(self.table.num_steps):
            run_step()
            if on_step is not None:
                on_step(i, buf.x0)
        return buf.x.clone()


def check_request(num: int, seed: int, dtype: str) -> None:
    """One-line errors for the arguments every way of drawing images takes."""
    if num <= 0:
        raise UserError(f"num must be positive, got {num}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not 0 <= seed < 2**63:
        raise UserError(f"seed must be in [0, 2^63), got {seed}")


def sample(model: DiffusionModel | str | None = None, num: int = 64, steps: int | None = None,
           sampler: str = "ddpm", eta: float = 0.0, seed: int = 0,
           device: str | torch.device | None = None, batch_size: int | None = None,
           progress: bool = False, spacing: str = "leading", clip: bool | None = None,
           backend: str = "torch", dtype: str = "fp32", cuda_graph: bool = True) -> torch.Tensor:
    """Draw `num` images; returns a float32 CPU tensor (num, C, H, W) in [−1, 1].

    model: a DiffusionModel, a model path, or None / 'default' for the bundled digits model.
    steps: sampling steps (default: the model's T). sampler: 'ddpm' | 'ddim' | 'dpm++'.
    Sample k of seed s is the same image whatever `batch_size` (default: min(num, 256))."""
    from .checkpoint import load

    check_request(num, seed, dtype)
    if batch_size is not None and batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    dev = resolve_device(device)
    if not isinstance(model, DiffusionModel):
        model = load(model or "default")
    table = model.table(sampler, steps, eta, spacing, clip)
    runner = Sampler(model, table, dev, DTYPES[dtype], backend, cuda_graph)
    batch_size = min(num, batch_size or 256)
    batches = math.ceil(num / batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=batches * table.num_steps, unit="step", desc="sampling")
    out = []
    for first in range(0, num, batch_size):
        n = min(batch_size, num - first)
        on_step = (lambda i, x0: bar.update(1)) if bar is not None else None
        out.append(runner.run(seed, first, n, on_step).float().clamp(-1.0, 1.0).cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)
