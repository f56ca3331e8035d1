"""What the network predicts — ε, x0 or v — and the sampler table rewritten for it.

diffusers' names: "epsilon" (the paper's ε-prediction), "sample" (x0 itself) and "v_prediction"
(v = √ᾱ_t ε − √(1−ᾱ_t) x0, Salimans & Ho 2022). For every one of them the true noise is linear
in (x_t, model output m):

    ε = q_x · x_t + q_m · m
        epsilon:  q_x = 0,              q_m = 1
        sample:   q_x = 1/√(1−ᾱ_t),    q_m = −√ᾱ_t/√(1−ᾱ_t)      (x_t = √ᾱ x0 + √(1−ᾱ) ε)
        v:        q_x = √(1−ᾱ_t),      q_m = √ᾱ_t                 (x0 = √ᾱ x_t − √(1−ᾱ) v)

so substituting it into a table built for ε (fastddpm/samplers.py: x̂0 = c_x x_t − c_e ε and the
c·ε term of x_prev) leaves a table of the same form in m: the kernel, the ONNX step graph and the
C++ sampler run every prediction type unchanged. x̂0's row is written in its closed form,

    x̂0 = k_x · x_t − k_m · m
        epsilon:  k_x = 1/√ᾱ_t,  k_m = √(1/ᾱ_t − 1)   (the ε table's c_x, c_e)
        sample:   k_x = 0,       k_m = −1
        v:        k_x = √ᾱ_t,    k_m = √(1−ᾱ_t)

which the substitution equals, but finite at ᾱ_t = 0 (t = T of a zero-terminal-SNR schedule),
where x̂0 from ε is undefined.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .errors import UserError
from .samplers import COEF_FIELDS, SamplerTable
from .variance import split_output

PREDICTIONS = ("epsilon", "sample", "v_prediction")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UserError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def noise_coefficients(prediction: str, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_x, q_m) with ε = q_x · x_t + q_m · m, float64, shaped like `alphas_cumprod` (ᾱ at each t)."""
    check_prediction(prediction)
    ac = alphas_cumprod.to(torch.float64)
    if prediction == "epsilon":
        return torch.zeros_like(ac), torch.ones_like(ac)
    if prediction == "sample":
        return (1.0 - ac).rsqrt(), -(ac / (1.0 - ac)).sqrt()
    return (1.0 - ac).sqrt(), ac.sqrt()


def for_prediction(table: SamplerTable, prediction: str) -> SamplerTable:
    """`table` (built for ε, its x̂0 row the ε one at `table.alphas_cumprod`) for a model that
    predicts `prediction`: x̂0's row (k_x, k_m) in its closed form, and c·ε = c q_x x_t + c q_m m."""
    check_prediction(prediction)
    if prediction == "epsilon":
        zero = (table.alphas_cumprod == 0).nonzero()
        if len(zero):
            t = int(table.timesteps[zero[0, 0]])
            raise UserError(f"ᾱ = 0 at t = {t} (rescale_betas_zero_snr, zero terminal SNR): an "
                            f"ε-prediction model's x̂0 is undefined there and the {table.name} "
                            "sampler steps from it; use a grid that skips it (--spacing leading) "
                            "or the dpm++ or unipc sampler (ᾱ = 2^-24 there, as diffusers')")
        return table
    # an ε-history ring keeps the model's output m, and an earlier step's ε is q_x·x + q_m·m at
    # that step's x, which no ring holds: such tables run ε-prediction models only
    if table.history_kind == "eps":
        raise UserError(f"the {table.name} sampler keeps a history of ε and runs ε-prediction "
                        f"models only; this model predicts {prediction} (use unipc or dpm++)")
    ac = table.alphas_cumprod
    q_x, q_m = noise_coefficients(prediction, ac)
    coef = table.coef.clone()
    c_x, c_e, b, c = (COEF_FIELDS.index(name) for name in ("c_x", "c_e", "b", "c"))
    if prediction == "sample":  # x̂0 = m
        coef[:, c_x], coef[:, c_e] = 0.0, -1.0
    else:  # x̂0 = √ᾱ x_t − √(1−ᾱ) v
        coef[:, c_x], coef[:, c_e] = ac.sqrt(), (1.0 - ac).sqrt()
    coef[:, b] = table.coef[:, b] + table.coef[:, c] * q_x
    coef[:, c] = table.coef[:, c] * q_m
    return dataclasses.replace(table, coef=coef)


def to_epsilon(output: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t: torch.Tensor,
               prediction: str) -> torch.Tensor:
    """The ε a model's output implies. output, x_t: (B, ...); alphas_cumprod_t: ᾱ at each
    sample's t, (B,). In x_t's dtype (float64 for the likelihood's float64 terms)."""
    if prediction == "epsilon":
        return output
    q_x, q_m = noise_coefficients(prediction, alphas_cumprod_t)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    q_x, q_m = q_x.to(x_t.device, x_t.dtype).view(shape), q_m.to(x_t.device, x_t.dtype).view(shape)
    return q_x * x_t + q_m * output.to(x_t.dtype)


def epsilon_denoiser(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     alphas_cumprod: torch.Tensor, prediction: str, learned: str | None = None
                     ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """`denoise(x_t, t)` turned into (the ε it implies, w), both float64 so that a likelihood's
    x̂0 and σ² keep the network's own digits: w of a `learned` variance (fastddpm/variance.py)
    from the output's second half, else None. alphas_cumprod: ᾱ (T,)."""
    check_prediction(prediction)

    def epsilon(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, w = split_output(denoise(x_t, t).double(), x_t.shape[1], learned)
        if prediction == "epsilon":
            return output, w
        ac_t = alphas_cumprod.to(t.device)[t]
        return to_epsilon(output, x_t.double(), ac_t, prediction), w

    return epsilon
