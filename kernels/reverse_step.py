"""The reverse-step update shared by every sampler (see fastddpm/samplers.py for the tables).

    x̂0     = c_x · x_t − c_e · ε                  (clipped to [−1, 1] if `clip`)
    x_prev = a · x̂0 + b · x_t + c · ε + Σ_k d_k · x̂0_{i−k} + σ · z
    σ      = σ_row · exp(s · w)   per element, with a learned variance w (else σ = σ_row)

A table row is (c_x, c_e, a, b, c, d_1 … d_H, s, σ_row); w comes from the model's variance
channels (fastddpm/variance.py). The x̂0 of earlier steps live in a ring
(K, *x.shape): the x̂0 of step s in slot s mod K. Step i reads x̂0_{i−k} from slot (i − k) mod K
for k = 1..K and writes its own x̂0 into slot i mod K (the slot of x̂0_{i−K}, read just before),
so the history costs one write per step, and the slots' roles follow from `step` alone — on the
device, with no host work. A row's d_k = 0 skips that slot's read.

With an ε history (`eps_history`, iPNDM's tables) the ring keeps the model's raw ε instead, and
the d_k mix it into ε before x̂0 is formed: ε' = ε + Σ_k d_k · ε_{i−k}, then x̂0 and x_prev as
above with ε' for ε and no Σ_k term of their own.

All arithmetic in float32 (float64 in the reference when given float64), I/O in the input dtype.
z is drawn from (seed, global sample index, step, element) by `noise.gaussian`; the kernel draws
the same numbers in registers, so nothing is stored — one Philox draw per four elements where
memory order is the logical order (`noise.gaussian4_triton`), one per element (its lane kept)
for channels_last or a sample size not divisible by 4 (`noise.gaussian_triton`). The row of the
table and the seed are read from device tensors: a CUDA graph captured once replays every step
and every seed with no host work. σ = 0 in the table's last row gives z = 0 there.

Bytes moved per element: read x, ε (and w, and the K x̂0 slots a row weighs), write x_prev (and
x̂0) — the kernel's floor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import HAS_TRITON, LazyOp, dense_layout, kernel_applies, use_fused
from .noise import STEP_STREAM, step_noise

BLOCK = 1024  # elements per program: 4 warps × 32 lanes × 8 (two 16-byte fp32 vectors each)
FIXED_COLUMNS = 7  # c_x, c_e, a, b, c, s, σ: a row's other columns are d_1 … d_H


def reverse_step_reference(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor,
                           z: torch.Tensor | None = None,
                           history: Sequence[torch.Tensor | None] | None = None,
                           clip: bool = False, variance: torch.Tensor | None = None, *,
                           eps_history: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch. x, eps, z, variance: (B, ...); coef: one table row (c_x, c_e, a, b, c,
    d1 … dk, s, σ); history: x̂0 of the previous steps, newest first (history[k−1] = x̂0_{i−k},
    weighed by d_k; None or missing = not read, its d_k must be 0) — or, with eps_history, their
    raw ε, mixed into ε before x̂0 (see the module docstring); variance: w of a learned
    variance, σ = σ_row · exp(s · w) per element. Returns (x_prev, x̂0)."""
    if isinstance(history, torch.Tensor):  # a (B, ...) x̂0_prev would be iterated over its batch
        raise TypeError("history is a sequence of x̂0 tensors, newest first (ring_history reads a ring)")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    row = coef.to(x.device, dtype)
    c_x, c_e, a, b, c = row[:5].unbind()
    d, slope, sigma = row[5:-2], row[-2], row[-1]
    xf, ef = x.to(dtype), eps.to(dtype)
    past = 0.0  # Σ_k d_k · (x̂0 or ε of step i − k)
    for d_k, old in zip(d, history or (), strict=False):
        if old is not None:
            past = past + d_k * old.to(dtype)
    if eps_history:
        ef, past = ef + past, 0.0
    x0 = c_x * xf - c_e * ef
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    out = a * x0 + b * xf + c * ef + past
    if z is not None:
        noise = sigma * z.to(dtype)
        if variance is not None:  # where σ_row = 0 no w is read (the kernel's too): 0, not 0·NaN
            noise = torch.where(sigma != 0, noise * torch.exp(slope * variance.to(dtype)), 0.0)
        out = out + noise
    return out.to(x.dtype), x0.to(x.dtype)


def ring_history(ring: torch.Tensor, step: torch.Tensor) -> list[torch.Tensor]:
    """The ring (K, B, ...) — x̂0 (or ε) of step s in slot s mod K — as history for step `step`
    (int64 (1,), on the device: no sync), newest first: slot (step − k) mod K for k = 1..K."""
    k = ring.shape[0]
    ages = torch.arange(1, k + 1, device=ring.device)
    return list(ring.index_select(0, torch.remainder(step - ages, k)).unbind())


def new_history(x: torch.Tensor, slots: int) -> torch.Tensor:
    """A zeroed x̂0 (or ε) ring (slots, *x.shape) whose every slot has x's dtype and memory layout."""
    fmt = dense_layout(x)
    flat = torch.zeros((slots * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    return flat.contiguous(memory_format=fmt).view(slots, *x.shape)


def _reference_step(x, eps, coef, step, rng, history, clip, variance, eps_history):
    """The reference with the table row, the ring's slots and the noise taken from device
    tensors (no sync)."""
    row = coef.index_select(0, step.view(1)).view(-1)
    # the counter-based draw is some thousand tiny ops: most of a small batch's step on the CPU,
    # where σ is read for free, so a row without noise (every row of a deterministic sampler)
    # skips it; on a GPU that read would sync, and σ = 0 zeroes the draw instead
    noiseless = row.device.type == "cpu" and row[-1].item() == 0.0
    z = None if noiseless else step_noise(rng, step, x.shape[0], tuple(x.shape[1:]))
    past = ring_history(history, step) if history is not None else None
    return reverse_step_reference(x, eps, row, z, past, clip, variance, eps_history=eps_history)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from .launch import Launch
    from .noise import gaussian4_triton, gaussian_triton

    @triton.jit
    def _reverse_step_kernel(
        x_ptr,  # (B, C, H, W) x_t, fp32/fp16/bf16, dense in NCHW or NHWC memory order
        eps_ptr,  # like x: ε
        var_ptr,  # like x: w of a learned variance (read only if LEARNED)
        ring_ptr,  # (HISTORY, *x.shape), slots like x: x̂0 (EPS_HISTORY: ε) of step s in slot s mod HISTORY
        out_ptr,  # like x: x_prev (may be x itself: each element is read before it is written)
        x0_out_ptr,  # like x: x̂0 (written only if STORE_X0)
        coef_ptr,  # (S, ROW) float32 contiguous: c_x, c_e, a, b, c, d_1 … d_{ROW−7}, s, σ per step
        step_ptr,  # (1,) int64: the row of coef
        rng_ptr,  # (2,) int64: seed, global index of the batch's first sample
        numel,  # B·C·H·W
        channels,  # C (1 for tensors that are not 4-D: the sample is then one flat run)
        pixels,  # H·W (the product of the non-batch, non-channel sizes)
        stream,  # Philox counter word 3: noise.STEP_STREAM
        CLIP: tl.constexpr,
        HISTORY: tl.constexpr,  # slots of the ring (0: no ring), at most ROW − 7
        EPS_HISTORY: tl.constexpr,  # the ring keeps ε, mixed into ε before x̂0 (iPNDM)
        ROW: tl.constexpr,  # the table's width
        STORE_X0: tl.constexpr,
        LEARNED: tl.constexpr,  # σ = σ_row · exp(s · w) per element
        CHANNELS_LAST: tl.constexpr,
        QUADS: tl.constexpr,  # NCHW with C·H·W % 4 == 0: the noise drawn four elements at a time
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        step = tl.load(step_ptr)
        row = coef_ptr + step * ROW
        c_x, c_e = tl.load(row), tl.load(row + 1)
        a, b, c = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
        sigma = tl.load(row + ROW - 1)

        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        e = tl.load(eps_ptr + offs, mask=mask).to(tl.float32)
        past = tl.zeros_like(x)  # Σ_k d_k · (x̂0 or ε of step i − k)
        for k in tl.static_range(1, HISTORY + 1):
            d_k = tl.load(row + 4 + k)
            if d_k != 0.0:  # warm-up rows and first-order steps read fewer slots
                slot = (step + HISTORY - k) % HISTORY
                past += d_k * tl.load(ring_ptr + slot * numel + offs, mask=mask).to(tl.float32)
        mixed = e + past if EPS_HISTORY else e
        x0 = c_x * x - c_e * mixed
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        out = a * x0 + b * x + c * mixed
        if not EPS_HISTORY:
            out += past
        if sigma != 0.0:  # DDIM(η=0), DPM-Solver++ and every last step skip Philox altogether
            per_sample = channels * pixels
            seed = tl.load(rng_ptr)
            first = tl.load(rng_ptr + 1)
            if QUADS:  # memory order is logical order and no sample splits a quad: a draw per 4
                lead = tl.program_id(0).to(tl.int64) * BLOCK + 4 * tl.arange(0, BLOCK // 4)
                sample = lead // per_sample
                quad = ((lead - sample * per_sample) // 4).to(tl.uint32)
                zero = quad * 0  # counters as full blocks, like the reference's
                z = gaussian4_triton(seed, quad, zero + step.to(tl.uint32),
                                     (first + sample).to(tl.uint32), zero + stream)
            else:  # a draw per element, its lane kept
                sample = offs // per_sample
                within = offs - sample * per_sample
                if CHANNELS_LAST:  # memory (h·w, c) → the noise contract's logical (c, h·w) index
                    pixel = within // channels
                    within = (within - pixel * channels) * pixels + pixel
                zero = within.to(tl.uint32) * 0
                z = gaussian_triton(seed, within.to(tl.uint32), zero + step.to(tl.uint32),
                                    (first + sample).to(tl.uint32), zero + stream)
            if LEARNED:
                w = tl.load(var_ptr + offs, mask=mask).to(tl.float32)
                z = z * tl.exp(tl.load(row + ROW - 2) * w)
            out += sigma * z
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if STORE_X0:
            tl.store(x0_out_ptr + offs, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)
        if HISTORY > 0:  # after every slot was read: this slot held x̂0_{i−HISTORY} (or ε)
            kept = e if EPS_HISTORY else x0
            tl.store(ring_ptr + (step % HISTORY) * numel + offs, kept.to(ring_ptr.dtype.element_ty),
                     mask=mask)

    def reverse_step_launch(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor,
                            step: torch.Tensor, rng: torch.Tensor, history: torch.Tensor | None,
                            out: torch.Tensor, x0_out: torch.Tensor | None, clip: bool,
                            variance: torch.Tensor | None = None, eps_history: bool = False) -> Launch:
        """The kernel's launch: x, eps, variance, out, x0_out and each slot of the ring `history`
        (K, *x.shape) dense with x's shape and strides; coef (S, 7 + H) float32 contiguous with
        H ≥ K. Tests run it directly under TRITON_INTERPRET=1."""
        channels_last = dense_layout(x) == torch.channels_last
        channels, pixels = (x.shape[1], x.shape[2] * x.shape[3]) if x.ndim == 4 else (1, x[0].numel())
        numel = x.numel()
        slots = 0 if history is None else history.shape[0]
        assert slots <= coef.shape[1] - FIXED_COLUMNS, "a ring slot without its d column"
        return Launch(
            _reverse_step_kernel, (triton.cdiv(numel, BLOCK),),
            (x, eps, variance if variance is not None else x, history if history is not None else x,
             out, x0_out if x0_out is not None else out, coef, step, rng, numel, channels, pixels,
             STEP_STREAM),
            dict(CLIP=clip, HISTORY=slots, EPS_HISTORY=eps_history, ROW=coef.shape[1],
                 STORE_X0=x0_out is not None, LEARNED=variance is not None,
                 CHANNELS_LAST=channels_last, QUADS=not channels_last and channels * pixels % 4 == 0,
                 BLOCK=BLOCK), num_warps=4)

    def _register_op() -> None:
        @triton_op("fastddpm::reverse_step", mutates_args={"history", "out", "x0_out"})
        def _reverse_step_op(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, step: torch.Tensor,
                             rng: torch.Tensor, history: torch.Tensor | None, out: torch.Tensor,
                             x0_out: torch.Tensor | None, clip: bool,
                             variance: torch.Tensor | None, eps_history: bool) -> None:
            """Writes x_prev into `out`, x̂0 into `x0_out` (if given) and x̂0 (ε with eps_history)
            into the ring `history`. Operands are prepared by `reverse_step`: dense, one layout,
            coef float32 contiguous."""
            if kernel_applies(x):
                reverse_step_launch(x, eps, coef, step, rng, history, out, x0_out, clip, variance,
                                    eps_history).run()
            else:  # reached under torch.compile tracing of CPU or float64 tensors
                _write_reference(x, eps, coef, step, rng, history, out, x0_out, clip, variance, eps_history)

        @_reverse_step_op.register_kernel("cpu")
        def _reverse_step_cpu(x, eps, coef, step, rng, history, out, x0_out, clip, variance, eps_history):
            _write_reference(x, eps, coef, step, rng, history, out, x0_out, clip, variance, eps_history)

    REVERSE_STEP_OP = LazyOp("reverse_step", _register_op)


def _write_reference(x, eps, coef, step, rng, history, out, x0_out, clip, variance, eps_history) -> None:
    x_prev, x0 = _reference_step(x, eps, coef, step, rng, history, clip, variance, eps_history)
    out.copy_(x_prev)
    if x0_out is not None:
        x0_out.copy_(x0)
    if history is not None:
        _store_in_ring(history, step, eps if eps_history else x0)


def _store_in_ring(history: torch.Tensor, step: torch.Tensor, value: torch.Tensor) -> None:
    """x̂0 (or ε) of step `step` into slot step mod K, by a device-side index (no sync)."""
    history.index_copy_(0, torch.remainder(step.view(1), history.shape[0]),
                        value.to(history.dtype).unsqueeze(0))


def reverse_step(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, step: torch.Tensor,
                 rng: torch.Tensor, history: torch.Tensor | None = None, clip: bool = False, *,
                 out: torch.Tensor | None = None, x0_out: torch.Tensor | None = None,
                 return_x0: bool = True, variance: torch.Tensor | None = None,
                 eps_history: bool = False, mode: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One reverse step with row `step` of the table and noise drawn from `rng`.

    x, eps: (B, ...) in one dtype; coef: (S, 7 + H) float32 table; step: int64 (1,) index into
    it, in [0, S) (not checked: that would sync the host); rng: int64 (2,) = (seed, global index
    of the batch's first sample). Both live on the device so a CUDA graph replays them.
    history: the x̂0 ring (K ≤ H, *x.shape) in x's dtype, each slot in x's layout (`new_history`),
    read and then updated in place (see the module docstring); None for tables without d's.
    eps_history: the ring keeps ε, not x̂0 (a table whose history_kind is "eps").
    `out` / `x0_out` (x's shape, dtype and layout) receive x_prev / x̂0 in place — `out` may be
    x. With return_x0=False and no x0_out, x̂0 is not returned (None). variance: w of a learned
    variance, x's shape (σ = σ_row · exp(s · w)); None: σ = σ_row. mode: see kernels.dispatch.
    Returns (x_prev, x̂0)."""
    for buffer in (out, x0_out):  # the contract of every path, not only the op's
        if buffer is not None and (buffer.dtype != x.dtype or buffer.shape != x.shape):
            raise ValueError(f"out buffers must match x in dtype and shape: x is {x.dtype} "
                             f"{tuple(x.shape)}, a buffer {buffer.dtype} {tuple(buffer.shape)}")
    if variance is not None and variance.shape != x.shape:
        raise ValueError(f"variance must have x's shape {tuple(x.shape)}, got {tuple(variance.shape)}")
    d_columns = coef.shape[1] - FIXED_COLUMNS
    if history is not None and (history.dtype != x.dtype or history.shape[1:] != x.shape
                                or not 0 < history.shape[0] <= d_columns):
        raise ValueError(f"history must be a ring (K, *x.shape) in x's dtype with K ≤ the table's "
                         f"{d_columns} d columns: x is {x.dtype} {tuple(x.shape)}, history "
                         f"{history.dtype} {tuple(history.shape)}")
    if not use_fused(mode, x, eps, history, variance):
        x_prev, x0 = _reference_step(x, eps, coef, step, rng, history, clip, variance, eps_history)
        if history is not None:
            _store_in_ring(history, step, eps if eps_history else x0)
        if out is not None:
            x_prev = out.copy_(x_prev)
        if x0_out is not None:
            x0 = x0_out.copy_(x0)
        return x_prev, (x0 if return_x0 or x0_out is not None else None)
    fmt = dense_layout(x)
    x = x.contiguous(memory_format=fmt)  # no copies when the caller's tensors already agree
    eps = eps.to(x.dtype).contiguous(memory_format=fmt)
    if variance is not None:
        variance = variance.to(x.dtype).contiguous(memory_format=fmt)
    coef = coef.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty_like(x)
    if x0_out is None and return_x0:
        x0_out = torch.empty_like(x)
    slots = [] if history is None else list(history)
    for buffer in (out, x0_out, *slots):  # the kernel walks every operand in x's memory order
        if buffer is not None and buffer.stride() != x.stride():
            raise ValueError(f"out buffers must match x in dtype and layout: x has strides "
                             f"{x.stride()}, a buffer {buffer.stride()}")
    if history is not None and history.stride(0) != x.numel():
        raise ValueError("history's slots must lie back to back (kernels.reverse_step.new_history)")
    REVERSE_STEP_OP()(x, eps, coef, step, rng, history, out, x0_out, clip, variance, eps_history)
    return out, x0_out
