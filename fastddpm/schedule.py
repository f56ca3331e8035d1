"""Noise schedules and every table derived from them, in float64, built once.

Notation follows Ho et al. 2020 ("DDPM"): β_t, α_t = 1 − β_t, ᾱ_t = Π_{s≤t} α_s, with t = 0..T−1
as array indices (the paper's t = 1..T). ᾱ_prev[0] = 1 (ᾱ_0 in the paper's indexing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import UserError, is_integer, is_number

KINDS = ("linear", "cosine", "quadratic", "custom")
MAX_TIMESTEPS = 100_000  # far past any published schedule; bounds the float64 tables (T,)


def make_betas(kind: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, betas: list[float] | None = None) -> torch.Tensor:
    """β_1..β_T as a float64 tensor of shape (T,)."""
    if kind == "linear":  # Ho et al. §4: β from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "quadratic":  # linear in √β (the DDPM repo's "quad")
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17, s = 0.008, β clipped at 0.999
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if kind == "custom":  # ScheduleConfig.validate has checked that the betas are there
        return torch.as_tensor(betas, dtype=torch.float64).clone()
    raise UserError(f"unknown beta schedule {kind!r}; choose one of {', '.join(KINDS)}")


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """β rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1; diffusers'
    rescale_betas_zero_snr), float64: √ᾱ shifted so that √ᾱ_T = 0 and scaled so that √ᾱ_1 keeps
    its value; then β_T = 1. Betas already at ᾱ_T = 0 are returned as they are (shift 0, scale 1:
    recomputing them would only add rounding), so a rescaled schedule written out and read back
    with the flag is unchanged."""
    betas = betas.to(torch.float64)
    root = torch.cumprod(1.0 - betas, 0).sqrt()
    if root[-1] == 0:
        return betas.clone()
    root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
    ac = root**2
    return 1.0 - torch.cat([ac[:1], ac[1:] / ac[:-1]])


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: list[float] | None = None  # only for kind="custom"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "num_timesteps": self.num_timesteps,
             "beta_start": self.beta_start, "beta_end": self.beta_end}
        if self.betas is not None:
            d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        unknown = set(d) - {"kind", "num_timesteps", "beta_start", "beta_end", "betas"}
        if unknown:
            raise UserError(f"unknown schedule field(s) {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Types and ranges, checked before any table is built (a file may say anything)."""
        if self.kind not in KINDS:
            raise UserError(f"unknown beta schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not is_integer(self.num_timesteps) or not 2 <= self.num_timesteps <= MAX_TIMESTEPS:
            raise UserError(f"schedule num_timesteps must be an integer in 2..{MAX_TIMESTEPS}, "
                            f"got {self.num_timesteps!r}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 < value < 1.0:
                raise UserError(f"schedule {name} must be a number in (0, 1), got {value!r}")
        if (self.kind == "custom") != (self.betas is not None):
            raise UserError("a custom schedule needs its betas (a list of num_timesteps numbers)"
                            if self.kind == "custom" else
                            f"schedule betas are for kind 'custom'; a {self.kind} schedule computes "
                            "its own (drop betas, or make the kind custom)")
        if self.betas is not None:
            if (not isinstance(self.betas, list | tuple)
                    or not all(map(is_number, self.betas))):
                raise UserError("schedule betas must be a list of numbers")
            if len(self.betas) != self.num_timesteps:
                raise UserError(f"the schedule lists {len(self.betas)} betas for "
                                f"num_timesteps={self.num_timesteps}")


@dataclass(frozen=True, eq=False)
class Schedule:
    """Every table of the forward process and its posterior, float64, shape (T,)."""

    config: ScheduleConfig
    betas: torch.Tensor = field(init=False)
    alphas: torch.Tensor = field(init=False)
    alphas_cumprod: torch.Tensor = field(init=False)
    alphas_cumprod_prev: torch.Tensor = field(init=False)
    sqrt_alphas_cumprod: torch.Tensor = field(init=False)
    sqrt_one_minus_alphas_cumprod: torch.Tensor = field(init=False)
    sqrt_recip_alphas_cumprod: torch.Tensor = field(init=False)
    sqrt_recipm1_alphas_cumprod: torch.Tensor = field(init=False)
    posterior_variance: torch.Tensor = field(init=False)
    posterior_log_variance_clipped: torch.Tensor = field(init=False)
    posterior_mean_coef1: torch.Tensor = field(init=False)
    posterior_mean_coef2: torch.Tensor = field(init=False)

    def __post_init__(self):
        c = self.config
        c.validate()  # a config made in code, not read by from_dict, is checked here
        betas = make_betas(c.kind, c.num_timesteps, c.beta_start, c.beta_end, c.betas)
        # β_T = 1 (ᾱ_T = 0) is a zero-terminal-SNR schedule (`zero_terminal_snr`); a 1 earlier
        # would leave every later ᾱ at 0 and the steps between them undefined
        if (betas.ndim != 1 or len(betas) < 2 or not bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all())
                or not 0 < betas[-1] <= 1):
            raise UserError("betas must be a 1-D list of at least 2 values in (0, 1), the last in "
                            "(0, 1] (1: zero terminal SNR)")
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)  (eq. 7)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": ac.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            # β̃ is 0 at t = 0 (the paper's t = 1), so its log uses β̃ at the next step there,
            # as the original DDPM code does.
            "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            # μ̃_t = coef1 · x̂0 + coef2 · x_t  (eq. 7)
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        for name, value in tables.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_device_tables", {})

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def table_on(self, name: str, device: torch.device) -> torch.Tensor:
        """Table `name` (float64) on `device`, copied there once: indexing it with timesteps that
        live on the device then needs no host sync (a training step's t is drawn there)."""
        key = (name, torch.device(device))
        if key not in self._device_tables:
            self._device_tables[key] = getattr(self, name).to(device)
        return self._device_tables[key]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε (eq. 4), t of shape (B,), x0 of shape (B, ...)."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = self.table_on("sqrt_alphas_cumprod", t.device)[t].to(x0.device, x0.dtype).view(shape)
        s = self.table_on("sqrt_one_minus_alphas_cumprod", t.device)[t]
        return a * x0 + s.to(x0.device, x0.dtype).view(shape) * noise
