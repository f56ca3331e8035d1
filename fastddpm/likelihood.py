"""Negative log-likelihood in bits/dim: the variational bound of Ho et al. 2020 (eq. 5, Table 2).

    −log p(x0) ≤ L = L_T + Σ_{t=2..T} L_{t−1} + L_0
    L_T     = KL(q(x_T | x0) ‖ N(0, I))                      the prior term, no parameters
    L_{t−1} = KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t))   two Gaussians, closed form
    L_0     = −log p_θ(x0 | x1)                              the discrete decoder (eq. 13)

p_θ(x_{t−1} | x_t) = N(μ̃_t(x_t, x̂0), σ_t² I) with x̂0 from the model's ε (clipped to [−r, r]
when the model's sampling clips, r its clip_range: 1 in the original evaluation) and σ_t² = β_t
(fixed_large) or β̃_t (fixed_small); at t = 1 both use β̃_2, the original code's clipped
log-variance. A learned variance (improved DDPM's L_vlb) gives σ² per element from the network's
variance channels (fastddpm/variance.py), between β_t and that clipped β̃_t for "learned_range",
as improved DDPM's code does; its KL terms and decoder then use that σ². The decoder
puts the mass of N(μ̃_1, σ_1²) on the 256 levels of 8-bit data (bins of width 2/255 in [−1, 1],
the outer two stretched to ±∞), so images are first rounded to those levels. Each L_{t−1} is
estimated with one x_t ~ q(x_t | x0) per image and t, its ε drawn from the counter-based noise
(seed, image index, t): an image's terms do not depend on the batch it ran in. The terms are
computed in float64 from the model's fp32 ε. Rate = L_T + Σ L_{t−1}, distortion = L_0 (§4.3).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backends import make_denoiser, resolve_device
from .errors import UserError
from .kernels.noise import FORWARD_STREAM, gaussian
from .limits import check_fits, request_bytes
from .model import DiffusionModel
from .prediction import epsilon_denoiser
from .progress import progress_bar
from .schedule import Schedule
from .variance import LEARNED, learned_sigma

# (x_t, t) → (ε, w of a learned variance or None): prediction.epsilon_denoiser
EpsilonDenoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

LEVELS = 256  # 8-bit data: the decoder's bins
HALF_BIN = 1.0 / (LEVELS - 1)  # half the width of one bin in [−1, 1]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round images in [−1, 1] to the nearest of the 256 levels of 8-bit data."""
    return torch.round((x + 1) * (LEVELS - 1) / 2) * (2 / (LEVELS - 1)) - 1


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi (±∞ allowed), without cancellation: a bin in the right
    tail is mirrored into the left one, where log Φ keeps its digits."""
    flip = lo > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - log_hi))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for x on the 8-bit grid of [−1, 1] under N(mean, e^{2·log_scale})
    discretized into the 256 bins (eq. 13), in nats."""
    inv_std = torch.exp(-log_scale)
    lo = torch.where(x < -1 + HALF_BIN, -math.inf, (x - HALF_BIN - mean) * inv_std)
    hi = torch.where(x > 1 - HALF_BIN, math.inf, (x + HALF_BIN - mean) * inv_std)
    return _log_mass(lo, hi)


def _per_dim_bits(nats: torch.Tensor) -> torch.Tensor:
    """(B, ...) nats per element → (B,) bits per dimension."""
    return nats.flatten(1).mean(1) / math.log(2.0)


def _rows(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] shaped (B, 1, 1, ...) to broadcast over images with `ndim` dims."""
    return table.to(t.device)[t].view(-1, *(1,) * (ndim - 1))


def prior_bits(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T per image in bits/dim: KL(N(√ᾱ_T x0, (1 − ᾱ_T) I) ‖ N(0, I))."""
    last = schedule.num_timesteps - 1
    mean = schedule.sqrt_alphas_cumprod[last].item() * x0
    logvar = torch.full_like(x0, math.log1p(-schedule.alphas_cumprod[last].item()))
    return _per_dim_bits(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)))


def bound_terms(denoise: EpsilonDenoiser, schedule: Schedule, variance: str, clip: float | None,
                x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One term of the bound per row, in bits/dim, for array timestep t (the paper's t + 1): the
    decoder L_0 where t = 0, else L_t, the KL term of the paper's step t + 1 → t.
    denoise(x_t, t) → (ε, w of a learned variance or None) (prediction.epsilon_denoiser);
    x0 (B, C, H, W) on the 8-bit grid, t (B,) int64, noise (B, C, H, W); clip: the r that x̂0 is
    clipped to [−r, r] by, None for no clipping."""
    x0 = x0.double()
    x_t = schedule.q_sample(x0, t, noise.double())
    eps, w = denoise(x_t.float(), t)
    n = x0.ndim
    x0_hat = _rows(schedule.sqrt_recip_alphas_cumprod, t, n) * x_t \
        - _rows(schedule.sqrt_recipm1_alphas_cumprod, t, n) * eps
    if clip is not None:
        x0_hat = x0_hat.clamp(-clip, clip)
    coef1, coef2 = _rows(schedule.posterior_mean_coef1, t, n), _rows(schedule.posterior_mean_coef2, t, n)
    model_mean = coef1 * x0_hat + coef2 * x_t
    posterior_logvar = _rows(schedule.posterior_log_variance_clipped, t, n)
    is_decoder = (t == 0).view(-1, *(1,) * (n - 1))
    model_logvar = posterior_logvar
    if variance == "fixed_large":  # β_t, except β̃_2 at t = 1 (β_1 would make the decoder too sharp)
        model_logvar = torch.where(is_decoder, posterior_logvar, _rows(schedule.betas.log(), t, n))
    elif variance in LEARNED:  # log σ² = 2 (log σ_row + s_row · w), the clipped β̃ as the floor
        clipped = schedule.posterior_log_variance_clipped.exp()
        sigma_row, slope = learned_sigma(variance, schedule.betas, clipped)
        model_logvar = 2.0 * (_rows(sigma_row.log(), t, n) + _rows(slope, t, n) * w)
    kl = normal_kl(coef1 * x0 + coef2 * x_t, posterior_logvar, model_mean, model_logvar)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    return _per_dim_bits(torch.where(is_decoder, decoder, kl))


@dataclass
class Bound:
    """The variational bound per image, bits/dim."""

    prior: torch.Tensor  # (N,) L_T
    terms: torch.Tensor  # (N, T): [:, 0] = L_0 (decoder), [:, i] = L_i (KL at the paper's t = i+1)

    @property
    def total(self) -> torch.Tensor:
        """(N,) the bound on −log p(x0) in bits/dim."""
        return self.prior + self.terms.sum(1)

    def summary(self) -> dict:
        """Means over the images (and the standard error of the total)."""
        total = self.total
        n = len(total)
        return {"num": n, "bits_per_dim": total.mean().item(),
                "standard_error": (total.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
                "rate": (self.prior + self.terms[:, 1:].sum(1)).mean().item(),
                "distortion": self.terms[:, 0].mean().item(), "prior": self.prior.mean().item()}


def _check_images(model: DiffusionModel, images: torch.Tensor) -> None:
    cfg = model.config
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or len(images) == 0:
        raise UserError(f"images must have shape (N, {', '.join(map(str, want))}) with N ≥ 1 for "
                        f"this model, got {tuple(images.shape)}")
    if not torch.isfinite(images).all() or images.min() < -1 or images.max() > 1:
        raise UserError("images must be finite and lie in [−1, 1]")


@torch.inference_mode()
def bits_per_dim(model: DiffusionModel, images: torch.Tensor, seed: int = 0,
                 device: str | torch.device | None = None, batch_size: int = 256,
                 progress: bool = False) -> Bound:
    """The bound for each of `images` (N, C, H, W) in [−1, 1] (rounded to 8 bits first): all T
    terms, N·T ε evaluations, run as batches of `batch_size` (image, t) pairs."""
    _check_images(model, images)
    if model.schedule.alphas_cumprod[-1] == 0:
        raise UserError("bits/dim needs ᾱ > 0 at t = T: this model's schedule has zero terminal SNR "
                        "(rescale_betas_zero_snr), where the bound's x̂0 goes through 1/√ᾱ_T")
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    dev = resolve_device(device)
    schedule = model.schedule
    num_t = schedule.num_timesteps
    # every (image, t) term kept in float64, one batch of pairs through the U-Net at a time
    pairs = len(images) * num_t
    batch = min(batch_size, pairs)
    check_fits(f"the bound of {len(images)} images in batches of {batch} (image, t) pairs",
               8 * pairs + request_bytes(model.config, 0, batch),
               "lower the batch size (--batch-size) or the number of images (--num)")
    variance = model.sampling.variance
    denoise = epsilon_denoiser(make_denoiser(model, "torch", dev, torch.float32), schedule.alphas_cumprod,
                               model.sampling.prediction, variance if variance in LEARNED else None)
    clip = model.sampling.clip_range if model.sampling.clip else None
    x0 = quantize(images.to(dev, torch.float64))
    terms = torch.empty(len(x0) * num_t, dtype=torch.float64, device=dev)
    with progress_bar(progress, total=len(terms), unit="term", desc="bits/dim") as update:
        for start in range(0, len(terms), batch_size):
            row = torch.arange(start, min(start + batch_size, len(terms)), device=dev)
            image, t = row // num_t, row % num_t
            noise = gaussian(seed, image, t.view(-1, 1), tuple(x0.shape[1:]), FORWARD_STREAM)
            terms[row] = bound_terms(denoise, schedule, model.sampling.variance, clip, x0[image], t, noise)
            update(len(row))
    return Bound(prior_bits(schedule, x0).cpu(), terms.view(len(x0), num_t).cpu())
