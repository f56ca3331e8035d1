"""The variational bound in bits/dim (fastddpm.likelihood) against closed forms.

An oracle ε-model for data that is one fixed image x* predicts x̂0 = x* exactly, so every KL
term reduces to the mismatch of two variances and the decoder to a Gaussian's mass on x*'s bins:
the whole bound is then known in closed form, computed here with torch.distributions and scipy."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from tiny import TINY

from fastddpm import kernels, likelihood
from fastddpm.cli import main
from fastddpm.data import digits
from fastddpm.errors import UserError
from fastddpm.likelihood import bits_per_dim, discretized_gaussian_log_likelihood, normal_kl, quantize
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.schedule import ScheduleConfig

LN2 = math.log(2.0)


def _grid_images(n: int, seed: int) -> torch.Tensor:
    """Random 8-bit images in [−1, 1] that include both extreme levels (the open-ended bins)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, 1, 8, 8), generator=g)
    levels[:, 0, 0, 0], levels[:, 0, 0, 1] = 0, 255
    return levels.double() / 127.5 - 1


def _log_bin_mass(x: np.ndarray, mean, scale) -> np.ndarray:
    """log of N(mean, scale²)'s mass on the 8-bit bins of x, with scipy: survival functions right
    of 0, where the CDF would round to 1; where even that underflows, the near edge's log mass."""
    lo = np.where(x < -1 + 1e-9, -np.inf, (x - 1 / 255 - mean) / scale)
    hi = np.where(x > 1 - 1e-9, np.inf, (x + 1 / 255 - mean) / scale)
    right = lo > 0
    p = np.where(right, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
    near_edge = np.where(right, norm.logsf(lo), norm.logcdf(hi))
    return np.where(p > 1e-290, np.log(np.maximum(p, 1e-300)), near_edge)


def test_quantize_lands_on_the_8bit_grid():
    x = torch.rand(1000, dtype=torch.float64) * 2 - 1
    q = quantize(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-9) and levels.min() >= 0 and levels.max() <= 255
    assert (q - x).abs().max() <= 1 / 255 + 1e-12
    assert torch.equal(quantize(q), q)


def test_decoder_mass_sums_to_one_over_the_256_levels():
    g = torch.Generator().manual_seed(1)
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean = torch.cat([torch.rand(30, generator=g, dtype=torch.float64) * 2.4 - 1.2,
                      torch.tensor([-3.0, 3.0], dtype=torch.float64)])
    log_scale = torch.rand(32, generator=g, dtype=torch.float64) * 6 - 7  # σ from 1e-3 to 0.37
    logp = discretized_gaussian_log_likelihood(grid[None, :], mean[:, None], log_scale[:, None])
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(32, dtype=torch.float64), rtol=0, atol=1e-12)


def test_decoder_matches_scipy_in_the_tails_too():
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 0.6, 1 - 2 / 255, 1.0], dtype=torch.float64)
    for mean, scale in [(0.1, 0.05), (-0.9, 0.01), (0.95, 0.003), (-1.0, 0.002)]:
        log_scale = torch.full_like(x, math.log(scale))
        got = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), log_scale)
        want = _log_bin_mass(x.numpy(), mean, scale)
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-9, atol=1e-9)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-12)


def _oracle_bound(model: DiffusionModel, x_star: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The bound, in bits/dim, of a denoiser whose x̂0 is always `x_hat` (clipped if the model
    clips) for data = x* (1, C, H, W): closed forms with torch.distributions and scipy."""
    s = model.schedule
    normal = torch.distributions.Normal
    if model.sampling.clip:
        x_hat = x_hat.clamp(-1, 1)
    last = s.num_timesteps - 1
    prior = torch.distributions.kl_divergence(
        normal(s.sqrt_alphas_cumprod[last] * x_star, s.sqrt_one_minus_alphas_cumprod[last]),
        normal(torch.zeros_like(x_star), 1.0)).mean() / LN2
    small = model.sampling.variance == "fixed_small"
    kl = 0.0
    for i in range(1, s.num_timesteps):  # the means differ by coef1 · (x̂0 − x*), whatever x_t
        std_q = s.posterior_variance[i].sqrt()
        std_p = std_q if small else s.betas[i].sqrt()
        shift = s.posterior_mean_coef1[i] * (x_hat - x_star)
        kl += torch.distributions.kl_divergence(normal(0.0, std_q), normal(shift, std_p)).mean() / LN2
    sigma = s.posterior_variance[1].sqrt().item()  # the decoder's σ: β̃ at the paper's t = 2
    decoder = -_log_bin_mass(x_star.numpy(), x_hat.numpy(), sigma).mean() / LN2  # μ̃_1 = x̂0
    return float(prior + kl + decoder)


@pytest.mark.parametrize("variance, scale, clip", [("fixed_large", 1.0, True), ("fixed_small", 1.0, True),
                                                   ("fixed_small", 1.3, True), ("fixed_large", 1.3, False)])
def test_bound_of_a_known_denoiser_is_the_closed_form(variance, scale, clip, monkeypatch):
    """scale = 1: the exact denoiser of x*; else one that predicts x̂0 = scale · x*, partly
    outside [−1, 1], so clipping and the KL's mean term count."""
    model = DiffusionModel.create(TINY, ScheduleConfig("linear", 40, 1e-3, 0.2),
                                  SamplingDefaults(variance, clip))
    x_star = _grid_images(1, seed=3)
    s = model.schedule

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = s.sqrt_alphas_cumprod[t.cpu()].view(-1, 1, 1, 1)
        sd = s.sqrt_one_minus_alphas_cumprod[t.cpu()].view(-1, 1, 1, 1)
        return ((x_t.double() - a * scale * x_star) / sd).float()

    monkeypatch.setattr(likelihood, "make_denoiser", lambda *args: denoiser)
    images = x_star.expand(3, -1, -1, -1).float()  # three draws of x_t per t: same bound each
    bound = bits_per_dim(model, images, seed=5, device="cpu", batch_size=17)
    assert bound.terms.shape == (3, 40) and bound.prior.shape == (3,)
    want = _oracle_bound(model, x_star, scale * x_star)
    torch.testing.assert_close(bound.total, torch.full((3,), want, dtype=torch.float64), rtol=1e-6, atol=0)
    if scale == 1.0 and variance == "fixed_small":  # nothing to pay between prior and decoder
        assert bound.terms[:, 1:].abs().max() < 1e-6


def test_each_term_sees_x_t_drawn_from_its_own_counter(monkeypatch):
    """Row (image j, t) evaluates ε at √ᾱ_t x0_j + √(1−ᾱ_t) z, z = gaussian(seed, j, t, FORWARD)."""
    model = DiffusionModel.create(TINY, ScheduleConfig("linear", 6))
    seen = []

    def recorder(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x_t.clone(), t.clone()))
        return torch.randn_like(x_t)

    monkeypatch.setattr(likelihood, "make_denoiser", lambda *args: recorder)
    images = _grid_images(2, seed=7)
    bits_per_dim(model, images.float(), seed=9, device="cpu", batch_size=5)
    x_t, t = torch.cat([x for x, _ in seen]), torch.cat([t for _, t in seen])
    image = torch.arange(12) // 6
    assert torch.equal(t, torch.arange(12) % 6)
    z = torch.cat([kernels.gaussian(9, torch.tensor([j]), int(i), (1, 8, 8), kernels.noise.FORWARD_STREAM)
                   for j, i in zip(image, t, strict=True)])
    want = model.schedule.q_sample(images[image], t, z.double()).float()
    torch.testing.assert_close(x_t, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DiffusionModel.create(TINY, ScheduleConfig("linear", 20))


def test_terms_do_not_depend_on_the_batch(tiny_model):
    images = _grid_images(3, seed=4).float()
    a = bits_per_dim(tiny_model, images, seed=1, device="cpu", batch_size=7)
    b = bits_per_dim(tiny_model, images, seed=1, device="cpu", batch_size=60)
    torch.testing.assert_close(a.terms, b.terms, rtol=1e-6, atol=1e-9)
    one = bits_per_dim(tiny_model, images[2:], seed=1, device="cpu")  # image 2 alone is image 0 now
    assert not torch.allclose(one.terms[0], a.terms[2])  # ...with image 0's noise, as documented
    c = bits_per_dim(tiny_model, images, seed=2, device="cpu")
    assert not torch.allclose(a.terms, c.terms)  # the seed draws other x_t
    summary = a.summary()
    assert summary["bits_per_dim"] == pytest.approx(summary["rate"] + summary["distortion"])


def test_bad_images_are_refused(tiny_model):
    with pytest.raises(UserError, match=r"shape \(N, 1, 8, 8\)"):
        bits_per_dim(tiny_model, torch.zeros(2, 3, 8, 8))
    with pytest.raises(UserError, match=r"\[−1, 1\]"):
        bits_per_dim(tiny_model, torch.full((2, 1, 8, 8), 1.5))
    with pytest.raises(UserError, match="batch size"):
        bits_per_dim(tiny_model, torch.rand(2, 1, 8, 8), batch_size=0)


def test_bundled_model_codes_real_digits_below_8_bits_and_scrambled_ones_above():
    real = digits(16).heldout[:2]
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    scrambled = real.flatten(1)[:, perm].view_as(real)  # same pixel values, no digit
    from fastddpm.checkpoint import load

    bound = bits_per_dim(load("default"), torch.cat([real, scrambled]), device="cpu")
    total = bound.total
    assert torch.isfinite(bound.terms).all() and (bound.terms >= -1e-9).all()
    assert total[:2].max() < 8.0 < total[2:].min()  # 8 bits/dim: uniform coding of 8-bit pixels


def test_eval_bpd_command(tmp_path, capsys):
    images = (_grid_images(6, seed=6) * 0.5 + 0.5).numpy()  # an .npz in [0, 1]
    np.savez(tmp_path / "x.npz", images=images[:, 0])
    from fastddpm import checkpoint

    model = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    checkpoint.save(DiffusionModel.create(TINY, ScheduleConfig("linear", 20)), model)
    argv = ["eval", "--bpd", "--model", str(model), "--data", str(tmp_path / "x.npz"), "--device", "cpu"]
    assert main(argv + ["--split", "train"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "train" and result["num"] == 5  # 6 images: one held out
    assert result["bits_per_dim"] > 0 and math.isfinite(result["standard_error"])
    assert main(argv + ["--num", "2"]) == 2
    assert "has 1 image(s)" in capsys.readouterr().err
    assert main(argv + ["--steps", "10"]) == 2
    assert "--bpd runs all T terms" in capsys.readouterr().err
