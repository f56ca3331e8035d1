"""Test helper: hand a diffusers scheduler our float64 tables.

diffusers keeps ᾱ in float32, whose cumulative product differs from our float64 table by up to
~1e-5 relatively near t = T; through 1/√ᾱ (≈160 there) that alone would swamp the comparisons.
With our tables in place the comparisons test formulas, timesteps, clipping and where noise
enters — not rounding."""
import torch

from fastddpm.schedule import Schedule


def with_float64_tables(scheduler, schedule: Schedule):
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler
