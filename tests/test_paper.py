"""Progressive generation, reconstruction from x_t and interpolation run the same loop."""
import pytest
import torch
from tiny import TINY_ATTN, tiny_model

from fastddpm import kernels, paper
from fastddpm.errors import UserError
from fastddpm.runtime import sample
from fastddpm.schedule import ScheduleConfig


@pytest.fixture(scope="module")
def model():
    return tiny_model(TINY_ATTN, ScheduleConfig("linear", 100))


def test_progressive_ends_at_the_sample(model):
    frames = paper.progressive(model, num=3, snapshots=4, steps=20, sampler="ddim", seed=2, device="cpu")
    assert frames.shape == (4, 3, 1, 8, 8)
    final = sample(model, num=3, steps=20, sampler="ddim", seed=2, device="cpu")
    torch.testing.assert_close(frames[-1], final)
    assert not torch.allclose(frames[0], frames[-1])


def test_reconstruct_equals_the_chain_written_out(model):
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    t, seed = 37, 4
    got = paper.reconstruct(model, x0, t, steps=10, sampler="ddim", spacing="leading", seed=seed,
                            device="cpu", dtype="fp32")
    table = model.table(start=t, sampler="ddim", steps=10, spacing="leading")
    assert table.timesteps.tolist() == [30, 20, 10, 0]  # 'leading' steps visited at or below 37
    ac = model.schedule.alphas_cumprod[30].item()
    eps0 = kernels.gaussian(seed, torch.arange(2), 0, (1, 8, 8), kernels.noise.INIT_STREAM)
    x = ac**0.5 * x0 + (1 - ac) ** 0.5 * eps0
    with torch.no_grad():
        for i, ti in enumerate(table.timesteps.tolist()):
            eps = model.unet(x, torch.full((2,), ti))
            x, _ = kernels.reverse_step_reference(x, eps, table.coef[i].float(), None, None, table.clip)
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_interpolation_endpoints_and_fixed_noise(model):
    a, b = torch.rand(2, 1, 8, 8) * 2 - 1
    out = paper.interpolate(model, a, b, [0.0, 0.5, 1.0], t=60, steps=25, seed=1, device="cpu")
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    # λ = 0 decodes a's latent with the reverse noise of sample 0: equal to reconstructing a alone
    torch.testing.assert_close(out[0], paper.reconstruct(model, a[None], 60, steps=25, seed=1,
                                                         device="cpu")[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[2])


def test_bad_arguments(model):
    with pytest.raises(UserError, match="start timestep"):
        model.table(start=100, sampler="ddpm")
    with pytest.raises(UserError, match="no visited timestep"):
        model.table(start=5, sampler="ddpm", steps=10, spacing="trailing")
    with pytest.raises(UserError, match="snapshots"):
        paper.progressive(model, snapshots=0, steps=5, device="cpu")
    with pytest.raises(UserError, match="weights must be in"):
        paper.interpolate(model, torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), [1.5], device="cpu")


def test_pairs_interpolate_at_once_each_with_its_own_fixed_noise(model):
    a, b = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    lambdas = [0.0, 0.3, 1.0]
    both = paper.interpolate(model, a, b, lambdas, t=60, steps=25, seed=3, device="cpu")
    assert both.shape == (3, 3, 1, 8, 8) and torch.isfinite(both).all()
    # pair 0 is the pair interpolated alone: sample 0's reverse noise, a and b as samples 0 and 1
    alone = paper.interpolate(model, a[0], b[0], lambdas, t=60, steps=25, seed=3, device="cpu")
    torch.testing.assert_close(both[:, 0], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[:, 1], both[:, 2])
    with pytest.raises(UserError, match="differ in shape"):
        paper.interpolate(model, a, b[:2], lambdas, device="cpu")
