"""The fused GroupNorm(+bias_nc)(+SiLU) kernels against the float64 reference, the dispatch
around them, and training through the reference.

On the CPU the Triton kernels run under the interpreter (conftest.py); on a GPU machine the same
tests run compiled (`pytest -m gpu`)."""
from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import DEVICES, assert_close, dtypes_for, needs_cuda, needs_triton, poisoned
from torch.fx.experimental.proxy_tensor import make_fx

from fastddpm import kernels

gn = importlib.import_module("fastddpm.kernels.group_norm_silu")  # the module, not the function

# (N, C, *spatial), groups
SHAPES = [
    ((2, 8, 5, 3), 4),  # odd H·W = 15: not a power of two, a padded tile
    ((1, 6, 1, 1), 3),  # batch 1, H·W = 1
    ((3, 6, 4, 3), 6),  # one channel per group
    ((2, 12, 3, 5), 4),  # 3 channels per group: a padded channel axis
    ((2, 64, 8, 8), 32),  # the U-Net's 32 groups (CIFAR-10's 8² level at a quarter width)
    ((2, 8, 10), 2),  # 3-D input: (N, C, L)
]
# the looped kernel (256² groups) on the shapes above where its chunks are few enough for the
# interpreter: 16-element chunks loop several times with a ragged last chunk
LOOPED_SHAPES = SHAPES[:4] + SHAPES[5:]
LOOPED = {"register_limit": 0, "loop_tile": 16}
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _inputs(shape, device, dtype, layout, bias_nc, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    # a mean well away from 0 and per-channel offsets: E[x²] − mean² would lose digits here
    x = (torch.randn(shape, generator=g) * 2.0 + 4.0).to(device, dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=layout)
    weight = (torch.rand(c, generator=g) + 0.5).to(device)
    bias = torch.randn(c, generator=g).to(device)
    b_nc = torch.randn(n, c, generator=g).to(device) if bias_nc else None
    return x, weight, bias, b_nc


def _expected(x, weight, bias, groups, b_nc, silu, dtype, scale_shift=None):
    """The float64 reference, rounded once to the I/O dtype."""
    y = gn.group_norm_silu_reference(x.double(), weight.double(), bias.double(), groups, 1e-6,
                                     None if b_nc is None else b_nc.double(), silu,
                                     None if scale_shift is None else scale_shift.double())
    return y.to(dtype)


def _scale_shift(x, seed=5):
    """(N, 2C) = [scale | shift] of diffusers' scale-shift conditioning, away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(x.shape[0], 2 * x.shape[1], generator=g) * 0.7 + 0.3).to(x.device)


def _check_against_reference(device, shape, groups, layout, **limits):
    if layout == torch.channels_last and (len(shape) != 4 or shape[2] * shape[3] == 1):
        pytest.skip("channels_last is the same memory as NCHW for this shape")
    for dtype in dtypes_for(device):
        for bias_nc, silu in [(False, True), (True, True), (True, False)]:
            x, weight, bias, b_nc = _inputs(shape, device, dtype, layout, bias_nc)
            out = poisoned(x)
            gn.group_norm_silu_launch(x, weight, bias, groups, 1e-6, b_nc, silu, out, **limits).run()
            assert out.stride() == x.stride()
            assert_close(out, _expected(x, weight, bias, groups, b_nc, silu, dtype), dtype)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_registers_kernel_matches_reference(device, shape, groups, layout):
    _check_against_reference(device, shape, groups, layout)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", LOOPED_SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_looped_kernel_matches_reference(device, shape, groups, layout):
    _check_against_reference(device, shape, groups, layout, **LOOPED)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", SHAPES[:4] + SHAPES[5:], ids=str)
@pytest.mark.parametrize("limits", [{}, LOOPED], ids=["registers", "looped"])
def test_scale_shift_matches_reference(device, shape, groups, limits):
    """GroupNorm → ·(1 + scale) + shift → SiLU (diffusers' scale-shift ResnetBlock2D), scale and
    shift per (sample, channel), folded into γ and β by the kernel; with and without SiLU."""
    layout = torch.channels_last if len(shape) == 4 and shape[2] * shape[3] > 1 else torch.contiguous_format
    for dtype in dtypes_for(device):
        x, weight, bias, _ = _inputs(shape, device, dtype, layout, False)
        scale_shift = _scale_shift(x)
        for silu in (True, False):
            out = poisoned(x)
            gn.group_norm_silu_launch(x, weight, bias, groups, 1e-6, None, silu, out,
                                      scale_shift=scale_shift, **limits).run()
            want = _expected(x, weight, bias, groups, None, silu, dtype, scale_shift)
            assert_close(out, want, dtype)
            # and it is not the plain norm: the scale and shift moved every sample
            plain = _expected(x, weight, bias, groups, None, silu, dtype)
            assert (want - plain).abs().amax() > 0.1


def test_scale_shift_reference_is_diffusers_order():
    """The reference against the formula of diffusers' ResnetBlock2D, written out in float64:
    GroupNorm, then h·(1 + scale) + shift with [scale | shift] = chunk(temb, 2), then SiLU."""
    x, weight, bias, _ = _inputs((2, 8, 3, 3), "cpu", torch.float64, torch.contiguous_format, False)
    temb = _scale_shift(x).double()
    scale, shift = temb[:, :8, None, None], temb[:, 8:, None, None]
    want = torch.nn.functional.silu(
        torch.nn.functional.group_norm(x, 4, weight.double(), bias.double(), 1e-6) * (1 + scale) + shift)
    got = gn.group_norm_silu_reference(x, weight.double(), bias.double(), 4, 1e-6, scale_shift=temb)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_the_largest_cifar_group_fits_in_registers(device):
    """384 channels / 32 groups at 32² = 12 × 1024 = 12,288 elements (the decoder's concat):
    one group here, so the interpreter stays quick, taken by the registers kernel."""
    shape = (1, 12, 32, 32)
    x, weight, bias, b_nc = _inputs(shape, device, torch.float32, torch.contiguous_format, True, 1)
    out = poisoned(x)
    gn.group_norm_silu_launch(x, weight, bias, 1, 1e-6, b_nc, True, out, loop_tile=0).run()
    assert_close(out, _expected(x, weight, bias, 1, b_nc, True, torch.float32))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limits", [{}, LOOPED], ids=["registers", "looped"])
def test_deterministic(device, limits):
    x, weight, bias, b_nc = _inputs((2, 8, 5, 5), device, torch.float32, torch.channels_last, True)
    first, second = poisoned(x), poisoned(x)
    for out in (first, second):
        gn.group_norm_silu_launch(x, weight, bias, 4, 1e-6, b_nc, True, out, **limits).run()
    assert torch.equal(first, second)


@needs_triton
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_256px_group_takes_the_looped_kernel(dtype):
    """A 256² model's first level: 128 channels / 32 groups × 65,536 pixels per group."""
    x, weight, bias, b_nc = _inputs((2, 128, 256, 256), "cuda", dtype, torch.channels_last, True)
    out = poisoned(x)
    gn.group_norm_silu_launch(x, weight, bias, 32, 1e-6, b_nc, True, out).run()
    assert_close(out, _expected(x, weight, bias, 32, b_nc, True, dtype), dtype)


# ---- the public function, the op, dispatch ---------------------------------------------------

def _ops_in_graph(fn, *args) -> set[str]:
    graph = make_fx(fn)(*args).graph
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


@needs_triton
def test_public_function_calls_the_op_where_fused():
    """In mode "op" the public function goes through fastddpm::group_norm_silu (its CPU kernel is
    the reference); in mode "reference" or with autograd recording it does not, and the traced
    graph holds only standard ops (what ONNX export needs)."""
    x, weight, bias, b_nc = _inputs((2, 8, 4, 4), "cpu", torch.float32, torch.contiguous_format, True)

    def call(x, weight, bias, b_nc):
        return kernels.group_norm_silu(x, weight, bias, 4, 1e-6, b_nc, mode="op")

    def reference(x, weight, bias, b_nc):
        return kernels.group_norm_silu(x, weight, bias, 4, 1e-6, b_nc, mode="reference")

    assert any("fastddpm.group_norm_silu" in op for op in _ops_in_graph(call, x, weight, bias, b_nc))
    assert not any("fastddpm" in op for op in _ops_in_graph(reference, x, weight, bias, b_nc))
    assert_close(call(x, weight, bias, b_nc), _expected(x, weight, bias, 4, b_nc, True, torch.float32))


def test_no_custom_op_without_a_fused_device():
    x, weight, bias, b_nc = _inputs((2, 8, 4, 4), "cpu", torch.float32, torch.contiguous_format, True)
    ops = _ops_in_graph(lambda *a: kernels.group_norm_silu(a[0], a[1], a[2], 4, 1e-6, a[3]),
                        x, weight, bias, b_nc)
    assert not any("fastddpm" in op for op in ops)


@pytest.mark.parametrize("mode", ["auto", "op"])
def test_training_differentiates_through_the_reference(mode):
    """Gradients for x, γ, β and bias_nc equal float64 autograd through F.group_norm + SiLU,
    whatever device the fused path claims (training routes around the op)."""
    x, weight, bias, b_nc = _inputs((2, 8, 5, 5), "cpu", torch.float32, torch.channels_last, True)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, b_nc)]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, b_nc)]
    grad_out = torch.randn(x.shape)
    kernels.group_norm_silu(leaves[0], leaves[1], leaves[2], 4, 1e-6, leaves[3],
                            mode=mode).backward(grad_out)
    gn.group_norm_silu_reference(leaves64[0], leaves64[1], leaves64[2], 4, 1e-6,
                                 leaves64[3]).backward(grad_out.double())
    for got, want in zip(leaves, leaves64, strict=True):
        assert_close(got.grad, want.grad.float(), atol=1e-4, rtol=1e-4)


@needs_triton
def test_op_cpu_kernel_is_the_reference():
    x, weight, bias, b_nc = _inputs((2, 8, 3, 3), "cpu", torch.float64, torch.contiguous_format, True)
    op = gn.GROUP_NORM_SILU_OP()  # registers fastddpm::group_norm_silu if nothing has yet
    got = op(x, weight, bias, 4, 1e-6, b_nc, True, None)
    want = gn.group_norm_silu_reference(x, weight, bias, 4, 1e-6, b_nc, True)
    assert torch.equal(got, want)
    scale_shift = _scale_shift(x).double()
    got = op(x, weight, bias, 4, 1e-6, None, True, scale_shift)
    want = gn.group_norm_silu_reference(x, weight, bias, 4, 1e-6, None, True, scale_shift)
    assert torch.equal(got, want)


# ---- on a GPU: the op eager, compiled, and inside the U-Net ------------------------------------

@needs_triton
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_on_cuda_eager_and_compiled(dtype):
    """Through the public function: the op's Triton body, then the same under torch.compile
    (triton_op lets inductor trace into the kernel)."""
    x, weight, bias, b_nc = _inputs((4, 64, 16, 16), "cuda", dtype, torch.channels_last, True)
    want = _expected(x, weight, bias, 32, b_nc, True, dtype)

    def call(x, weight, bias, b_nc):
        return kernels.group_norm_silu(x, weight, bias, 32, 1e-6, b_nc)

    with torch.inference_mode():
        assert_close(call(x, weight, bias, b_nc), want, dtype)
        assert_close(torch.compile(call, fullgraph=True)(x, weight, bias, b_nc), want, dtype)


@needs_triton
@needs_cuda
@pytest.mark.gpu
def test_unet_fused_equals_unet_on_references():
    from fastddpm.unet import CONFIGS, UNet

    unet = UNet(CONFIGS["digits"]).cuda().eval()
    x = torch.randn(3, 1, 16, 16, device="cuda")
    t = torch.tensor([0, 500, 999], device="cuda")
    with torch.inference_mode():
        fused = unet(x, t)
        reference = unet.set_kernels("reference")(x, t)
    assert_close(fused, reference, atol=1e-4, rtol=1e-4)


def test_kernels_work_without_triton():
    """With triton unimportable, both public functions run their references."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from fastddpm import kernels
assert not kernels.HAS_TRITON
from fastddpm.kernels.noise import gaussian
x, eps = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
weight, bias = torch.rand(8) + 0.5, torch.randn(8)
y = kernels.group_norm_silu(x, weight, bias, 4, 1e-6)
F = torch.nn.functional
assert torch.allclose(y, F.silu(F.group_norm(x, 4, weight, bias, eps=1e-6)), atol=1e-6)
for mode in ("auto", "op"):  # "op" falls back too: there is no op without triton
    coef = torch.rand(3, 7)
    x_prev, x0 = kernels.reverse_step(x, eps, coef, torch.tensor([1]), torch.tensor([9, 4]), mode=mode)
    # row 1 of the table, and the noise of step 1 for samples 4 and 5 of seed 9
    z = gaussian(9, torch.arange(4, 6), 1, (8, 3, 3))
    want, want_x0 = kernels.reverse_step_reference(x, eps, coef[1], z)
    c_x, c_e, a, b, c, d, sigma = coef[1]
    assert torch.allclose(want_x0, c_x * x - c_e * eps, atol=1e-6)
    assert torch.allclose(want, a * want_x0 + b * x + c * eps + sigma * z, atol=1e-6)
    assert torch.equal(x_prev, want) and torch.equal(x0, want_x0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
