"""The sampling loop: x_T → x_0 with any sampler table over any ε backend.

Per step: ε = denoise(x, t[step]); x, x̂0 = reverse_step(x, ε, coef, step, rng) (a learned-variance
network's output split into its prediction and variance halves first). `step` and `rng`
live on the device, so on CUDA one step is captured once as a CUDA graph (per batch size) and
replayed for every step with no host work in between: no sync, no allocation, no Python
scheduler. Noise comes from (seed, global sample index, step, element), so a sample's image does
not depend on the batch it was drawn in.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import kernels, sessions
from .backends import get_backend, resolve_device, resolve_threads
from .errors import UserError
from .kernels.noise import INIT_STREAM
from .limits import check_request_fits
from .model import DiffusionModel
from .options import MAX_BATCH, SamplingOptions
from .progress import progress_bar
from .variance import split_output


class _Buffers:
    """The state one step reads and writes, at fixed addresses (what a CUDA graph needs).
    history: the ring of a multistep sampler (its `table.history` slots; the x̂0 — or, for an
    ε-history table, the ε — of step i in slot i mod K), None for one-step samplers. x0: the
    step's x̂0 for an `on_step` callback when there is no x̂0 ring to read it from; otherwise
    None — nobody reads it, so it is not written."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 history: int, eps_history: bool, store_x0: bool):
        self.x = torch.empty(shape, device=device, dtype=dtype)
        self.history = kernels.new_history(self.x, history) if history else None
        self.x0_in_ring = bool(history) and not eps_history
        self.x0 = torch.empty(shape, device=device, dtype=dtype) if store_x0 and not self.x0_in_ring else None
        self.step = torch.zeros(1, device=device, dtype=torch.int64)
        self.rng = torch.zeros(2, device=device, dtype=torch.int64)  # (seed, first sample index)

    def reset(self, x_start: torch.Tensor, seed: int, first: int) -> None:
        self.x.copy_(x_start)
        if self.history is not None:
            self.history.zero_()  # the first steps' d's are 0; no NaN from the previous run
        self.step.zero_()
        self.rng.copy_(torch.tensor([seed, first], dtype=torch.int64))

    def x0_of(self, step: int) -> torch.Tensor:
        """The x̂0 step `step` (just run) wrote."""
        return self.history[step % self.history.shape[0]] if self.x0_in_ring else self.x0


class Sampler:
    """Runs one sampler over one model on one device, as `options` say.

    `start=t` begins the chain at x_t (the visited timesteps ≤ t). `sampler.run(seed, first,
    batch)` returns x_0 (batch, C, H, W) in the model dtype."""

    def __init__(self, model: DiffusionModel, options: SamplingOptions | None = None,
                 start: int | None = None, **choices):
        self.options = options = SamplingOptions.of(options, **choices)
        self.model = model
        self.table = model.table(options, start)
        self.device = resolve_device(options.device)
        self.dtype = options.torch_dtype(self.device)
        cfg = model.config
        self.image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        # kept for the process (fastddpm.sessions): a second Sampler of the same model, backend,
        # device, dtype, threads and quantization converts, exports and compiles nothing
        self.denoise = sessions.denoiser(model, options.backend, self.device, self.dtype,
                                         options.threads, options.quantize)
        self.coef = self.table.coef.to(device=self.device, dtype=torch.float32)
        self.timesteps = self.table.timesteps.to(self.device)
        self.use_graph = (options.cuda_graph and self.device.type == "cuda"
                          and get_backend(options.backend).graph_capturable)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, _Buffers]] = {}

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's prediction at x (B, C, H, W), t (B,), and the w of its learned variance
        where this sampler's table reads one (else None: other samplers use the prediction only)."""
        return split_output(self.denoise(x, t), x.shape[1], self.table.learned_variance)

    def _step(self, buf: _Buffers) -> None:
        t = self.timesteps.index_select(0, buf.step).expand(buf.x.shape[0])
        eps, w = self.predict(buf.x, t)
        # in place: x_prev over x, x̂0 (or ε) into the ring (each element is read before it is written)
        kernels.reverse_step(buf.x, eps, self.coef, buf.step, buf.rng, buf.history, self.table.clip,
                             out=buf.x, x0_out=buf.x0, return_x0=False, variance=w,
                             eps_history=self.table.history_kind == "eps")
        buf.step.add_(1)

    def _buffers(self, batch: int, store_x0: bool) -> _Buffers:
        return _Buffers((batch, *self.image_shape), self.device, self.dtype, self.table.history,
                        self.table.history_kind == "eps", store_x0)

    def _graph_for(self, batch: int, store_x0: bool, x_T: torch.Tensor, seed: int, first: int):
        key = (batch, store_x0)
        if key not in self._graphs:
            buf = self._buffers(batch, store_x0)
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
            self._graphs[key] = (graph, buf)
        return self._graphs[key]

    def initial_noise(self, seed: int, first: int, batch: int) -> torch.Tensor:
        index = torch.arange(first, first + batch, device=self.device)
        z = kernels.gaussian(seed, index, 0, self.image_shape, INIT_STREAM, device=self.device)
        return z.to(self.dtype)

    @torch.inference_mode()
    def run(self, seed: int, first: int, batch: int,
            on_step: Callable[[int, torch.Tensor], None] | None = None,
            x_start: torch.Tensor | None = None,
            on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Samples `first .. first+batch−1` of the stream `seed`.

        on_step(i, x̂0) sees every step's predicted x_0 (progressive generation); without it
        x̂0 is not even stored, unless the sampler keeps it as history (an x̂0 ring). on_progress(i) is told
        of each step done. x_start (batch, C, H, W) replaces x_T: a point on the chain at the
        table's first timestep (`Sampler(start=t)`)."""
        # every batch is bounded here, where it is drawn (bench's --batch-size, a shard, a chunk
        # of an FID job, a direct caller); a caller that keeps images checks them (check_request)
        check_request_fits(self.model.config, batch, batch, f"a batch of {batch} images",
                           "lower the batch size (--batch-size)")
        if x_start is None:
            x_start = self.initial_noise(seed, first, batch)
        elif tuple(x_start.shape) != (batch, *self.image_shape):
            raise UserError(f"x_start must have shape {(batch, *self.image_shape)}, "
                            f"got {tuple(x_start.shape)}")
        x_start = x_start.to(self.device, self.dtype)
        store_x0 = on_step is not None
        if self.use_graph:
            graph, buf = self._graph_for(batch, store_x0, x_start, seed, first)
            buf.reset(x_start, seed, first)
            run_step = graph.replay
        else:
            buf = self._buffers(batch, store_x0)
            buf.reset(x_start, seed, first)
            run_step = lambda: self._step(buf)  # noqa: E731
        for i in range(self.table.num_steps):
            run_step()
            if on_step is not None:  # the kernel's x̂0 is x̂0/x0_scale (samplers.with_clip_range)
                x0, scale = buf.x0_of(i), self.table.x0_scale
                on_step(i, x0 if scale == 1.0 else x0 * scale)
            if on_progress is not None:
                on_progress(i)
        return buf.x.clone()


def check_request(num: int, seed: int, model: DiffusionModel | None = None,
                  kept: int | None = None, batch: int | None = None, what: str | None = None) -> None:
    """One-line errors for the arguments every way of drawing images takes. With `model`, also
    that the request fits in this machine's memory (fastddpm.limits): `kept` images (default
    `num`) held until written, one batch of `batch` (default min(num, MAX_BATCH)) at a time;
    `what` names the request in the message (default: drawing `num` images)."""
    if num <= 0:
        raise UserError(f"num must be positive, got {num}")
    if not 0 <= seed < 2**63:
        raise UserError(f"seed must be in [0, 2^63), got {seed}")
    if model is not None:
        check_request_fits(model.config, num if kept is None else kept,
                           min(num, MAX_BATCH) if batch is None else batch,
                           what or f"drawing {num} images", "ask for fewer" if what else
                           "ask for fewer (sharded sampling under torchrun writes as it goes)")


def sample(model: DiffusionModel | str | None = None, num: int = 64, seed: int = 0,
           options: SamplingOptions | None = None, progress: bool = False,
           **choices) -> torch.Tensor:
    """Draw `num` images; returns a float32 CPU tensor (num, C, H, W) in [−1, 1].

    model: a DiffusionModel, a model path, or None / 'default' for the bundled digits model.
    options: a SamplingOptions, or its fields as keywords (`steps=50, sampler="ddim"`).
    Sample k of seed s is the same image whatever the batch size."""
    from .checkpoint import load

    options = SamplingOptions.of(options, **choices)
    check_request(num, seed)
    if not isinstance(model, DiffusionModel):
        model = load(model or "default")
    check_request(num, seed, model, batch=min(num, options.batch_size or MAX_BATCH))
    # the Sampler (its engine, table and CUDA graphs) is kept for the next call in this process
    options = options.replace(threads=resolve_threads(options.threads))
    runner = sessions.cached(sessions.SAMPLERS, model, options, lambda: Sampler(model, options))
    return draw(runner, seed, options.batches(num), progress)


def draw(runner: Sampler, seed: int, batches: list[tuple[int, int]],
         progress: bool = False) -> torch.Tensor:
    """The samples of stream `seed` in `batches` ((first, size) pairs) by `runner`: a float32
    CPU tensor (Σ size, C, H, W) in [−1, 1]."""
    with progress_bar(progress, total=len(batches) * runner.table.num_steps, unit="step",
                      desc="sampling") as update:
        out = [runner.run(seed, first, n, on_progress=lambda i: update(1)).float().clamp(-1.0, 1.0).cpu()
               for first, n in batches]
    return torch.cat(out)
