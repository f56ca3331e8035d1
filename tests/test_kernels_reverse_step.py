"""The fused reverse step against its reference, and its in-kernel noise against noise.gaussian.

On the CPU the Triton kernel runs under the interpreter (conftest.py); on a GPU machine the same
tests run compiled (`pytest -m gpu`)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from kernel_checks import DEVICES, assert_close, dtypes_for, needs_cuda, needs_triton, poisoned

from fastddpm import kernels
from fastddpm.kernels import dispatch, noise
from fastddpm.samplers import COEF_FIELDS, SAMPLERS, ddpm_table, make_table
from fastddpm.schedule import Schedule, ScheduleConfig

SCHEDULE = Schedule(ScheduleConfig("linear", 1000))
rs = importlib.import_module("fastddpm.kernels.reverse_step")  # the module, not the function

SHAPES = [
    (1, 3, 5, 7),  # batch 1, odd sizes, 105 elements < one block
    (2, 3, 33, 31),  # 6138 elements: several blocks and a ragged last one
    (3, 4, 1, 1),  # H·W = 1
    (2, 1, 6, 6),  # one channel
    (3, 10),  # not 4-D: the sample is one flat run
]
# NCHW, and NHWC where it differs from NCHW (4-D with C > 1 and H·W > 1)
LAYOUTS = [torch.contiguous_format, torch.channels_last]


ROW = len(COEF_FIELDS)
SLOTS = ROW - rs.FIXED_COLUMNS  # the widest ring a table row weighs


def _inputs(shape, dtype, device, layout, seed=0, slots=SLOTS):
    """x, ε, an x̂0 ring of `slots` (random: every slot's role is checked) and a table of 5 rows."""
    g = torch.Generator().manual_seed(seed)

    def rand(*lead):
        t = torch.randn((*lead, *shape), generator=g).to(device, dtype)
        if len(shape) != 4:
            return t
        if not lead:
            return t.contiguous(memory_format=layout)
        # each slot in x's layout, back to back, as new_history makes them
        return rs.new_history(t[0].contiguous(memory_format=layout), lead[0]).copy_(t)

    coef = torch.rand(5, ROW, generator=g) * 2 - 0.5  # never zero, both signs, σ ≠ 0
    coef[:, 0] += 1.0  # c_x ≥ 0.5: x̂0 leaves [−1, 1] often, so clipping is exercised
    return rand(), rand(), rand(slots), coef.to(device)


def _want(x, eps, coef, step, ring, z, clip, variance=None, eps_history=False):
    """The reference's (x_prev, x̂0) and the ring after the step (x̂0 — ε with eps_history — in
    slot step mod K)."""
    past = rs.ring_history(ring, torch.tensor([step], device=ring.device)) if ring is not None else None
    want, want_x0 = rs.reverse_step_reference(x, eps, coef[step], z, past, clip, variance,
                                              eps_history=eps_history)
    ring_after = None
    if ring is not None:
        ring_after = ring.clone()
        ring_after[step % ring.shape[0]] = eps if eps_history else want_x0
    return want, want_x0, ring_after


def _device_tensors(device, step, seed, first):
    return (torch.tensor([step], dtype=torch.int64, device=device),
            torch.tensor([seed, first], dtype=torch.int64, device=device))


def _launch(x, eps, coef, step, rng, ring=None, clip=False, store_x0=True, variance=None,
            eps_history=False):
    """Runs the kernel on a copy of the ring; returns (x_prev, x̂0, the ring after)."""
    out = poisoned(x)
    x0_out = poisoned(x) if store_x0 else None
    ring = None if ring is None else rs.new_history(x, ring.shape[0]).copy_(ring)
    rs.reverse_step_launch(x, eps, coef, step, rng, ring, out, x0_out, clip, variance, eps_history).run()
    return out, x0_out, ring


def _noise_only(shape, device, sigma=1.0):
    """A table whose every row is x_prev = σ·z: the kernel then outputs its own noise."""
    coef = torch.zeros(8, ROW, device=device)  # steps 0..7
    coef[:, -1] = sigma
    zeros = torch.zeros(shape, device=device)
    return zeros, coef


def _kernel_noise(shape, device, step, seed, first):
    x, coef = _noise_only(shape, device)
    step_t, rng = _device_tensors(device, step, seed, first)
    out, _, _ = _launch(x, x, coef, step_t, rng, store_x0=False)
    return out


# the kernel's words are Philox's exactly; its log/cos round differently from torch's (numpy in
# the interpreter: measured 4.8e-7 = 1 ulp at |z| ≈ 4; CUDA's approximate log/cos: a few ulp)
NOISE_ATOL = {"cpu": 1e-6, "cuda": 1e-5}


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("clip", [False, True], ids=["raw", "clip"])
def test_kernel_matches_reference(device, shape, layout, clip):
    if layout == torch.channels_last and (len(shape) != 4 or shape[1] == 1 or shape[2] * shape[3] == 1):
        pytest.skip("channels_last is the same memory as NCHW for this shape")
    for dtype in dtypes_for(device):
        x, eps, ring, coef = _inputs(shape, dtype, device, layout)
        step, rng = _device_tensors(device, 3, 1234, 17)
        out, x0, ring_after = _launch(x, eps, coef, step, rng, ring, clip)
        z = noise.gaussian(1234, torch.arange(17, 17 + shape[0]), 3, shape[1:]).to(device)
        want, want_x0, want_ring = _want(x, eps, coef, 3, ring, z, clip)
        assert out.stride() == x.stride()
        assert_close(out, want, dtype)
        assert_close(x0, want_x0, dtype)
        assert_close(ring_after, want_ring, dtype)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("clip", [False, True], ids=["raw", "clip"])
def test_kernel_with_an_eps_ring_matches_reference(device, shape, layout, clip):
    """iPNDM's ring keeps ε: the d's mix it into ε before x̂0 (clipped or not), and the step's
    own raw ε — not x̂0 — goes into slot step mod K."""
    if layout == torch.channels_last and len(shape) != 4:
        pytest.skip("channels_last is the same memory as NCHW for this shape")
    for dtype in dtypes_for(device):
        x, eps, ring, coef = _inputs(shape, dtype, device, layout, seed=9)
        step, rng = _device_tensors(device, 4, 321, 2)
        out, x0, ring_after = _launch(x, eps, coef, step, rng, ring, clip, eps_history=True)
        z = noise.gaussian(321, torch.arange(2, 2 + shape[0]), 4, shape[1:]).to(device)
        want, want_x0, want_ring = _want(x, eps, coef, 4, ring, z, clip, eps_history=True)
        assert out.shape == x0.shape == x.shape and ring_after.shape == ring.shape
        assert not any(torch.isnan(t).any() for t in (out, x0, ring_after))  # poison overwritten
        assert_close(out, want, dtype)
        assert_close(x0, want_x0, dtype)
        assert_close(ring_after, want_ring, dtype)
        # the mix reached x̂0: an x̂0-ring step on the same inputs gives another one
        assert (x0.float() - _want(x, eps, coef, 4, ring, z, clip)[1].float()).abs().max() > 1e-2


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_without_history_and_without_x0_output(device):
    x, eps, _, coef = _inputs((2, 3, 7, 5), torch.float32, device, torch.contiguous_format, seed=1)
    step, rng = _device_tensors(device, 0, 5, 0)
    coef[:, 5:-2] = 0.0  # no d's: no earlier x̂0, as in DDPM and DDIM
    out, x0, _ = _launch(x, eps, coef, step, rng, None, False, store_x0=False)
    z = noise.gaussian(5, torch.arange(2), 0, (3, 7, 5)).to(device)
    assert x0 is None
    assert_close(out, rs.reverse_step_reference(x, eps, coef[0], z)[0])


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slots", [1, 2, SLOTS])
@pytest.mark.parametrize("eps_history", [False, True], ids=["x0-ring", "eps-ring"])
def test_in_place_outputs(device, slots, eps_history):
    """The runtime writes x_prev over x and x̂0 (or ε) into the ring slot of step i−K, read
    first; step 4 of a ring of 1, 2, 3 slots puts each slot in another role."""
    x, eps, ring, coef = _inputs((2, 3, 9, 9), torch.float32, device, torch.contiguous_format, 2, slots)
    step, rng = _device_tensors(device, 4, 8, 4)
    z = noise.gaussian(8, torch.arange(4, 6), 4, (3, 9, 9)).to(device)
    want, _, want_ring = _want(x, eps, coef, 4, ring, z, True, eps_history=eps_history)
    rs.reverse_step_launch(x, eps, coef, step, rng, ring, x, None, True, eps_history=eps_history).run()
    assert_close(x, want)
    assert_close(ring, want_ring)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_table_every_step(device, sampler):
    """Real tables (float64 → float32 on the device), a ring of the table's history carried from
    step to step as the runtime does: each step against the reference."""
    options = {"variance": "fixed_large"} if sampler == "ddpm" else {"eta": 0.5} if sampler == "ddim" else {}
    tab = make_table(SCHEDULE, sampler, 6, "trailing", clip=True, **options)
    coef = tab.coef.to(device, torch.float32)
    x, eps, _, _ = _inputs((2, 3, 4, 4), torch.float32, device, torch.contiguous_format, 3)
    ring = rs.new_history(x, tab.history) if tab.history else None
    want_ring = None if ring is None else ring.clone()
    eps_history = tab.history_kind == "eps"
    for i in range(tab.num_steps):
        step, rng = _device_tensors(device, i, 77, 0)
        eps = eps * 0.9 + 0.1  # a new ε each step: an ε ring's slots differ
        out, x0, ring = _launch(x, eps, coef, step, rng, ring, tab.clip, eps_history=eps_history)
        z = noise.gaussian(77, torch.arange(2), i, (3, 4, 4)).to(device)
        want, want_x0, want_ring = _want(x, eps, coef, i, want_ring, z, tab.clip, eps_history=eps_history)
        tol = 1e-5 * max(1.0, coef[i].abs().max().item())
        assert_close(out, want, atol=tol)
        assert_close(x0, want_x0, atol=tol)
        if ring is not None:
            assert_close(ring, want_ring, atol=tol)
        x = out


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 2, 4, 4)], ids=["per-element", "quads"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_learned_variance_matches_reference(device, shape, layout):
    """σ = σ_row · exp(s · w) per element: w random of both signs, s random per row (never 0),
    with a ring and clipping on, so the variance term rides beside every other one."""
    for dtype in dtypes_for(device):
        x, eps, ring, coef = _inputs(shape, dtype, device, layout, seed=7)
        w = _inputs(shape, dtype, device, layout, seed=8)[0]
        step, rng = _device_tensors(device, 2, 41, 3)
        out, x0, ring_after = _launch(x, eps, coef, step, rng, ring, True, variance=w)
        z = noise.gaussian(41, torch.arange(3, 3 + shape[0]), 2, shape[1:]).to(device)
        want, want_x0, want_ring = _want(x, eps, coef, 2, ring, z, True, w)
        fixed, _, _ = _want(x, eps, coef, 2, ring, z, True)
        assert (want.float() - fixed.float()).abs().max() > 0.1  # w moved σ
        assert_close(out, want, dtype)
        assert_close(x0, want_x0, dtype)
        assert_close(ring_after, want_ring, dtype)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_learned_variance_tables_every_step(device, variance):
    """Real learned-variance DDPM tables, each step against the reference; at the last step
    (σ = 0) a NaN w — log of a negative v under "learned" — is never read."""
    tab = ddpm_table(SCHEDULE, 6, "leading", clip=True, variance=variance)
    coef = tab.coef.to(device, torch.float32)
    assert tab.learned_variance == variance and coef[-1, -1] == 0
    x, eps, _, _ = _inputs((2, 3, 4, 4), torch.float32, device, torch.contiguous_format, 9)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(10)).to(device) * 2 - 1
    for i in range(tab.num_steps):
        if i == tab.num_steps - 1:
            w = torch.full_like(w, float("nan"))
        step, rng = _device_tensors(device, i, 12, 0)
        out, x0, _ = _launch(x, eps, coef, step, rng, None, tab.clip, variance=w)
        z = noise.gaussian(12, torch.arange(2), i, (3, 4, 4)).to(device)
        want, want_x0, _ = _want(x, eps, coef, i, None, z, tab.clip, w)
        assert_close(out, want)
        assert_close(x0, want_x0)
        x = out


# ---- the noise ------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 3, 2**40 + 12345], ids=["seed0", "seed3", "seed64bit"])
@pytest.mark.parametrize("shape", [(3, 3, 8, 5), (3, 3, 7, 5)], ids=["quads", "per-element"])
def test_noise_equals_reference_gaussian(device, seed, shape):
    """3·8·5 = 120 elements per sample: a draw per four; 105: a draw per element."""
    z = _kernel_noise(shape, device, step=7, seed=seed, first=11)
    want = noise.gaussian(seed, torch.arange(11, 14), 7, shape[1:]).to(device)
    assert_close(z, want, atol=NOISE_ATOL[device], rtol=0.0)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_noise_follows_logical_order_in_channels_last(device):
    """The noise contract indexes (C, H, W), whatever the memory order: channels_last draws per
    element, NCHW per four, and the two agree exactly."""
    shape = (2, 3, 4, 5)
    x, coef = _noise_only(shape, device)
    x = x.contiguous(memory_format=torch.channels_last)
    step, rng = _device_tensors(device, 2, 9, 0)
    out, _, _ = _launch(x, x, coef, step, rng, store_x0=False)
    assert_close(out, _kernel_noise(shape, device, 2, 9, 0), atol=0.0, rtol=0.0)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_noise_other_seed_other_noise(device):
    shape = (2, 3, 6, 6)
    a = _kernel_noise(shape, device, 4, 21, 0)
    assert torch.equal(a, _kernel_noise(shape, device, 4, 21, 0))
    other = _kernel_noise(shape, device, 4, 22, 0)
    assert (a != other).float().mean() > 0.99


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_noise_statistics(device):
    """n = 24,576 draws per seed. Bounds at 5 standard errors (a false alarm ~ 6e-7 per check):
    |mean| < 5/√n, |var − 1| < 5·√(2/n), |corr| < 5/√n for neighbouring elements, neighbouring
    samples and consecutive steps."""
    shape = (8, 3, 32, 32)
    n = math.prod(shape)
    for seed in (1, 2):
        z = _kernel_noise(shape, device, 0, seed, 0).double().cpu()
        z_next_step = _kernel_noise(shape, device, 1, seed, 0).double().cpu()
        flat = z.flatten()
        assert abs(flat.mean()) < 5 / math.sqrt(n)
        assert abs(flat.var() - 1.0) < 5 * math.sqrt(2 / n)
        pairs = {
            "neighbouring elements": (flat[:-1], flat[1:]),
            "neighbouring samples": (z[:-1].flatten(), z[1:].flatten()),
            "consecutive steps": (flat, z_next_step.flatten()),
        }
        for name, (u, v) in pairs.items():
            corr = torch.corrcoef(torch.stack([u, v]))[0, 1]
            assert abs(corr) < 5 / math.sqrt(u.numel()), f"{name}: corr {corr:.4f}"


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_no_noise_where_sigma_is_zero(device):
    """A DDPM table's last row has σ = 0: x_prev is the posterior mean exactly."""
    tab = ddpm_table(SCHEDULE, 5, variance="fixed_large", clip=True)
    coef = tab.coef.to(device, torch.float32)
    assert coef[-1, -1] == 0 and (coef[:-1, -1] > 0).all()
    x, eps, _, _ = _inputs((2, 3, 5, 5), torch.float32, device, torch.contiguous_format, 4)
    step, rng = _device_tensors(device, tab.num_steps - 1, 3, 0)
    out, _, _ = _launch(x, eps, coef, step, rng, None, tab.clip)
    assert_close(out, rs.reverse_step_reference(x, eps, coef[-1], None, (), tab.clip)[0])


@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("ddpm", {"variance": "fixed_large"})])
def test_cpu_reference_draws_noise_exactly_where_sigma_is_not_zero(sampler, options):
    """On the CPU the reference skips the draw on rows with σ = 0 (every row of deterministic
    DDIM, DDPM's last): each step equals the reference given the draw, noise and all."""
    tab = make_table(SCHEDULE, sampler, 5, "trailing", clip=True, **options)
    coef = tab.coef.to(torch.float32)
    assert (coef[:, -1] == 0).all() if sampler == "ddim" else (coef[:-1, -1] > 0).all()
    x, eps, _, _ = _inputs((2, 3, 4, 4), torch.float32, "cpu", torch.contiguous_format, 8)
    for i in range(tab.num_steps):
        step, rng = _device_tensors("cpu", i, 13, 0)
        out, _ = kernels.reverse_step(x, eps, coef, step, rng, None, tab.clip, mode="reference")
        z = noise.gaussian(13, torch.arange(2), i, (3, 4, 4))
        want = rs.reverse_step_reference(x, eps, coef[i], z, None, tab.clip)[0]
        assert torch.equal(out, want)
        x = out


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_batch_split_invariance(device):
    """Samples 10..13 drawn as one batch or as two batches of two: the same noise."""
    whole = _kernel_noise((4, 3, 5, 5), device, 6, 99, 10)
    first = _kernel_noise((2, 3, 5, 5), device, 6, 99, 10)
    second = _kernel_noise((2, 3, 5, 5), device, 6, 99, 12)
    assert torch.equal(whole, torch.cat([first, second]))


# ---- the public function and the op ----------------------------------------------------------

def test_step_noise_reads_device_tensors_like_gaussian():
    got = noise.step_noise(torch.tensor([2**40 + 5, 3]), torch.tensor([4]), 2, (3, 4, 4))
    assert torch.equal(got, noise.gaussian(2**40 + 5, torch.arange(3, 5), 4, (3, 4, 4)))


@pytest.mark.parametrize("via_op", [False, True], ids=["reference", "op"])
def test_public_reverse_step(via_op):
    """The public function (CPU, mode "auto": the reference; mode "op": the op and its CPU
    kernel) — out buffers, in place, return_x0=False, and mismatched buffers refused."""
    if via_op and not dispatch.HAS_TRITON:
        pytest.skip("the op exists only with triton")
    mode = "op" if via_op else "auto"
    x, eps, ring, coef = _inputs((2, 3, 4, 4), torch.float32, "cpu", torch.contiguous_format, 5)
    step, rng = _device_tensors("cpu", 2, 6, 1)
    z = noise.gaussian(6, torch.arange(1, 3), 2, (3, 4, 4))
    want, want_x0, want_ring = _want(x, eps, coef, 2, ring, z, True)
    scratch = ring.clone()
    got, got_x0 = kernels.reverse_step(x, eps, coef, step, rng, scratch, True, mode=mode)
    assert_close(got, want)
    assert_close(got_x0, want_x0)
    assert_close(scratch, want_ring)
    got, none = kernels.reverse_step(x, eps, coef, step, rng, ring.clone(), True, return_x0=False,
                                     mode=mode)
    assert none is None
    assert_close(got, want)
    with pytest.raises(ValueError, match="history must be a ring"):  # a bare x̂0_prev (B, ...)
        kernels.reverse_step(x, eps, coef, step, rng, ring[0], True, mode=mode)
    if via_op:  # the op's contract: buffers in x's dtype and layout (was an assert)
        with pytest.raises(ValueError, match="out buffers must match x"):
            kernels.reverse_step(x, eps, coef, step, rng, ring, True, out=x.double(), mode=mode)
    scratch = ring.clone()  # an ε ring: ε stored, mixed in before x̂0
    want_e, want_e_x0, want_e_ring = _want(x, eps, coef, 2, ring, z, True, eps_history=True)
    got, got_x0 = kernels.reverse_step(x, eps, coef, step, rng, scratch, True, eps_history=True, mode=mode)
    assert_close(got, want_e)
    assert_close(got_x0, want_e_x0)
    assert_close(scratch, want_e_ring)
    x0_out = torch.empty_like(x)
    kernels.reverse_step(x, eps, coef, step, rng, ring, True, out=x, x0_out=x0_out, mode=mode)
    assert_close(x, want)
    assert_close(x0_out, want_x0)
    assert_close(ring, want_ring)


@pytest.mark.parametrize("via_op", [False, True], ids=["reference", "op"])
def test_public_reverse_step_with_variance(via_op):
    """The variance reaches the reference and the op's CPU kernel; a mis-shaped one is refused."""
    if via_op and not dispatch.HAS_TRITON:
        pytest.skip("the op exists only with triton")
    mode = "op" if via_op else "auto"
    x, eps, _, coef = _inputs((2, 3, 4, 4), torch.float32, "cpu", torch.contiguous_format, 11)
    w = _inputs((2, 3, 4, 4), torch.float32, "cpu", torch.contiguous_format, 12)[0]
    step, rng = _device_tensors("cpu", 1, 6, 0)
    z = noise.gaussian(6, torch.arange(2), 1, (3, 4, 4))
    want, want_x0, _ = _want(x, eps, coef, 1, None, z, False, w)
    got, got_x0 = kernels.reverse_step(x, eps, coef, step, rng, variance=w, mode=mode)
    assert_close(got, want)
    assert_close(got_x0, want_x0)
    with pytest.raises(ValueError, match="variance must have x's shape"):
        kernels.reverse_step(x, eps, coef, step, rng, variance=w[:, :2], mode=mode)


@needs_triton
@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_replays_new_steps_and_seeds():
    """Captured once, the step reads its row and seed from memory at every replay."""
    shape = (3, 3, 8, 8)
    x, eps, _, coef = _inputs(shape, torch.float16, "cuda", torch.contiguous_format, 6)
    step, rng = _device_tensors("cuda", 0, 1, 0)
    out, x0_out = poisoned(x), poisoned(x)
    kernels.reverse_step(x, eps, coef, step, rng, out=out, x0_out=x0_out)  # warm-up: compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.reverse_step(x, eps, coef, step, rng, out=out, x0_out=x0_out)
    for i, seed in [(1, 5), (4, 2**33)]:
        step.fill_(i)
        rng.copy_(torch.tensor([seed, 7]))
        graph.replay()
        z = noise.gaussian(seed, torch.arange(7, 10), i, shape[1:]).cuda()
        assert_close(out, rs.reverse_step_reference(x, eps, coef[i], z)[0])
