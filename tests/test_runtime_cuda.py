"""The sampling loop on a GPU with the bundled model: CUDA-graph replay against the plain loop,
one graph replayed for new seeds and new sample ranges, batch-size independence, CUDA against the
CPU, fp16/bf16, the compiled backend inside the graph, and the bits/dim bound. Skipped without
CUDA; run with `pytest -m gpu` (benchmarks/gpu_suite.sh does)."""
import pytest
import torch

from fastddpm.checkpoint import load
from fastddpm.options import SamplingOptions
from fastddpm.runtime import Sampler, sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# (sampler, steps, eta): every kind of table row — DDPM's σ > 0 with clipping, DDIM with and
# without noise, DPM-Solver++ reading x̂0 of the step before
SAMPLERS = [("ddpm", 50, None), ("ddim", 20, 0.0), ("ddim", 20, 1.0), ("dpm++", 15, None)]


@pytest.fixture(scope="module")
def model():
    return load("default")


@pytest.fixture
def strict_fp32():
    """cuDNN convolutions in true fp32 (PyTorch lets them round to TF32 by default), so that a
    GPU and a CPU loop can be compared on float32 rounding alone."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS)
def test_graph_replay_equals_the_plain_loop(model, sampler, steps, eta):
    options = SamplingOptions(sampler=sampler, steps=steps, eta=eta, device="cuda")
    graphed = Sampler(model, options, cuda_graph=True)
    plain = Sampler(model, options, cuda_graph=False)
    assert graphed.use_graph and not plain.use_graph
    image = (model.config.out_channels, model.config.image_size, model.config.image_size)
    # the second and third runs replay the graph captured in the first: a new seed, new samples
    for seed, first, batch in [(3, 0, 6), (4, 0, 6), (3, 6, 6)]:
        got = graphed.run(seed, first, batch)
        assert got.shape == (batch, *image) and torch.isfinite(got).all()
        torch.testing.assert_close(got, plain.run(seed, first, batch), rtol=1e-5, atol=1e-5)
    assert list(graphed._graphs) == [(6, False)]  # one graph per batch size, captured once
    # and no x̂0 buffer in it unless the sampler reads x̂0 back (DPM-Solver++'s history)
    assert (graphed._graphs[(6, False)][1].x0 is not None) == (sampler == "dpm++")


def test_a_sample_is_the_same_image_at_any_batch_size(model):
    whole = sample(model, num=10, steps=20, sampler="ddim", seed=11, device="cuda")
    for batch_size in (1, 3, 7):  # one graph per batch size; the last batch is smaller
        part = sample(model, num=10, steps=20, sampler="ddim", seed=11, device="cuda",
                      batch_size=batch_size)
        torch.testing.assert_close(part, whole, rtol=0, atol=1e-4)
    other = sample(model, num=10, steps=20, sampler="ddim", seed=12, device="cuda")
    assert (other - whole).abs().mean() > 0.1


@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS)
def test_cuda_draws_the_images_the_cpu_draws(model, sampler, steps, eta, strict_fp32):
    """Same noise on both (the kernel's Philox equals the reference's), so the same images to
    float32 rounding: an eighth of one 8-bit grey level (1/127.5 in [−1, 1]) at most."""
    kwargs = dict(num=8, steps=steps, sampler=sampler, eta=eta, seed=5)
    torch.testing.assert_close(sample(model, device="cuda", **kwargs),
                               sample(model, device="cpu", **kwargs), rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_sampling_follows_fp32(model, dtype):
    """fp16/bf16 I/O and weights, fp32 statistics and step arithmetic: finite, in range, and the
    same images as fp32 up to low-precision drift (correlation over all pixels)."""
    kwargs = dict(num=16, steps=20, sampler="ddim", seed=9, device="cuda")
    low, full = sample(model, dtype=dtype, **kwargs), sample(model, **kwargs)
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and low.abs().max() <= 1
    correlation = torch.corrcoef(torch.stack([low.flatten(), full.flatten()]))[0, 1]
    assert correlation > 0.99, f"{dtype} images drift from fp32: correlation {correlation:.4f}"


def test_compiled_backend_inside_the_graph_equals_eager(model):
    options = SamplingOptions(sampler="ddim", steps=10, device="cuda")
    eager = Sampler(model, options, backend="torch").run(2, 0, 4)
    compiled = Sampler(model, options, backend="compile")
    assert compiled.use_graph
    torch.testing.assert_close(compiled.run(2, 0, 4), eager, rtol=1e-4, atol=1e-4)


def test_progressive_x0_reaches_every_step_under_the_graph(model):
    seen = []
    runner = Sampler(model, sampler="ddim", steps=12, device="cuda")
    out = runner.run(1, 0, 2, on_step=lambda i, x0: seen.append((i, x0.clone())))
    assert [i for i, _ in seen] == list(range(12))
    assert list(runner._graphs) == [(2, True)]  # its own graph: one that writes x̂0
    # the last x̂0 is the image: DDIM's final step returns its x̂0
    torch.testing.assert_close(seen[-1][1], out, rtol=1e-5, atol=1e-5)
    assert (seen[0][1] - seen[-1][1]).abs().mean() > 1e-3  # and the early ones are not it yet


def test_bits_per_dim_on_cuda_equals_the_cpu(model, strict_fp32):
    """The bound's N·T terms on the GPU: same x_t (counter-based noise), same terms."""
    from fastddpm.likelihood import bits_per_dim

    images = sample(model, num=3, steps=10, sampler="ddim", seed=4, device="cpu")
    gpu = bits_per_dim(model, images, seed=1, device="cuda", batch_size=512)
    cpu = bits_per_dim(model, images, seed=1, device="cpu", batch_size=512)
    assert torch.isfinite(gpu.terms).all()
    torch.testing.assert_close(gpu.terms, cpu.terms, rtol=1e-4, atol=1e-7)
