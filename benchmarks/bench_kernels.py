"""The fused kernels against eager PyTorch, as bandwidth: both are memory-bound, so the floor is
bytes moved / copy bandwidth, and the copy bandwidth is measured in the same run.

    pytest benchmarks/bench_kernels.py --benchmark-json=kernels.json     (a CUDA device)

GroupNorm(+SiLU) at the U-Net's shapes — CIFAR-10: C ∈ {128, 256} at 32², 16², 8², 4²; 256²
models: C = 128 at 256² — and the reverse step at image shapes (3×32², 3×256²), batch 1/64/256.
Peers: eager PyTorch at every case, and torch.compile of the same unfused ops at batch 64 (the
issue's target batch). Each case records in `benchmark.extra_info`: GPU time from CUDA events
(`ms`, do_bench median), the same under a CUDA graph as the sampler runs it (`ms_graph`: no
launch overhead), bytes moved, GB/s and its fraction of the measured copy bandwidth.
pytest-benchmark's own columns are host wall time per call with a synchronise. Inputs come from
the references' module, the same one the tests use, so the benchmarked and the tested code
cannot drift apart.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastddpm import kernels
from fastddpm.dtypes import DTYPES as ALL_DTYPES
from fastddpm.samplers import ddim_table, ddpm_table, make_table
from fastddpm.schedule import Schedule, ScheduleConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU figures pending: the kernel benchmarks need a CUDA device")

BATCHES = [1, 64, 256]
GN_SHAPES = [(128, 32), (128, 16), (128, 8), (128, 4), (256, 32), (256, 16), (256, 8), (256, 4),
             (128, 256)]  # (C, H = W)
STEP_SHAPES = [(3, 32), (3, 256)]  # (C, H = W): CIFAR-10 and the 256² models' images
DTYPES = {name: ALL_DTYPES[name] for name in ("fp32", "fp16")}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
GROUPS, EPS = 32, 1e-6
# fused: ours; eager: the unfused PyTorch ops; compile: the same ops through torch.compile
# (inductor writes its own fused Triton kernel), at the target batch only: a compile per case
IMPLS = ["fused", "eager", "compile"]
COMPILE_BATCH = 64


def _skip_compile_off_target(impl: str, batch: int) -> None:
    if impl == "compile" and batch != COMPILE_BATCH:
        pytest.skip(f"torch.compile is measured at batch {COMPILE_BATCH} only (a compile per case)")


def _compiled(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _gpu_ms(fn) -> tuple[float, float]:
    """(median ms per call from CUDA events, the same replayed from a CUDA graph)."""
    from triton.testing import do_bench, do_bench_cudagraph

    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    try:
        ms_graph = do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # an eager path that cannot be captured is reported without the graph figure
        ms_graph = float("nan")
    return ms, ms_graph


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Device copy bandwidth: read + write of a 1 GiB buffer, GB/s."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = _gpu_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _record(benchmark, fn, nbytes: int, copy_gbps: float, **info) -> None:
    fn()  # warm-up: Triton compilation
    ms, ms_graph = _gpu_ms(fn)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "ms": ms, "ms_graph": ms_graph,
        "bytes": nbytes, "gbps": nbytes / ms / 1e6, "gbps_graph": nbytes / ms_graph / 1e6,
        "copy_gbps": copy_gbps, "fraction_of_copy": nbytes / ms / 1e6 / copy_gbps})

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)


def _group_norm_case(channels, size, batch, dtype, layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype, generator=g)
    x = x.contiguous(memory_format=layout)
    weight = torch.rand(channels, device="cuda", generator=g) + 0.5
    bias = torch.randn(channels, device="cuda", generator=g)
    return x, weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("channels,size", GN_SHAPES, ids=lambda v: str(v))
@torch.inference_mode()
def test_group_norm_silu(benchmark, copy_gbps, channels, size, batch, dtype, layout, impl):
    benchmark.group = f"group_norm_silu C{channels} {size}² b{batch} {dtype} {layout}"
    _skip_compile_off_target(impl, batch)
    x, weight, bias = _group_norm_case(channels, size, batch, DTYPES[dtype], LAYOUTS[layout])
    if impl == "fused":
        def fn():
            return kernels.group_norm_silu(x, weight, bias, GROUPS, EPS)
    else:
        def unfused(x):
            return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))

        op = _compiled(unfused) if impl == "compile" else unfused

        def fn():
            return op(x)
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y
    _record(benchmark, fn, nbytes, copy_gbps, kernel="group_norm_silu", impl=impl,
            shape=list(x.shape), dtype=dtype, layout=layout)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "unipc3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("channels,size", STEP_SHAPES, ids=lambda v: str(v))
@torch.inference_mode()
def test_reverse_step(benchmark, copy_gbps, channels, size, batch, dtype, sampler, impl):
    """A step with clipping and x̂0 written: DDPM draws noise (σ > 0), DDIM (η = 0) does not, so
    the pair shows what the in-kernel Philox costs (one draw per four elements) against the 8 to
    16 bytes each element moves — whether the noisy fp16 step stays memory-bound. UniPC-3 (20
    steps, a middle one) reads three x̂0's of earlier steps from its ring and writes its own there:
    the multistep solvers' extra traffic."""
    benchmark.group = f"reverse_step {channels}×{size}² b{batch} {dtype} {sampler}"
    _skip_compile_off_target(impl, batch)
    schedule = Schedule(ScheduleConfig("linear", 1000))
    # the tables a sampler of the CIFAR-10 model builds: clipped, DDPM's σ² = β, DDIM's η = 0
    if sampler == "ddpm":
        table = ddpm_table(schedule, 1000, variance="fixed_large", clip=True)
    elif sampler == "ddim":
        table = ddim_table(schedule, 1000, clip=True)
    else:
        table = make_table(schedule, sampler, 20, "trailing", clip=True)
    coef = table.coef.to("cuda", torch.float32)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, eps = (torch.randn(batch, channels, size, size, device="cuda", dtype=DTYPES[dtype],
                          generator=g) for _ in range(2))
    step = torch.tensor([10], device="cuda")
    rng = torch.tensor([0, 0], device="cuda")
    out = torch.empty_like(x)
    ring = kernels.new_history(x, table.history).normal_() if table.history else None
    x0 = torch.empty_like(x) if ring is None else None  # with a ring, x̂0 goes there
    if impl == "fused":
        def fn():
            kernels.reverse_step(x, eps, coef, step, rng, ring, True, out=out, x0_out=x0,
                                 return_x0=False)
    else:  # what a scheduler does unfused: draw z, then the update as separate torch ops
        row = coef[10]
        past = None if ring is None else list(ring)

        def unfused(x, eps):
            z = torch.randn_like(x) if sampler == "ddpm" else None
            return kernels.reverse_step_reference(x, eps, row, z, past, True)

        op = _compiled(unfused) if impl == "compile" else unfused

        def fn():
            return op(x, eps)
    # read x, ε (and the ring's slots); write x_prev, x̂0
    nbytes = (4 + table.history) * x.numel() * x.element_size()
    _record(benchmark, fn, nbytes, copy_gbps, kernel="reverse_step", impl=impl,
            shape=list(x.shape), dtype=dtype, sampler=sampler)
