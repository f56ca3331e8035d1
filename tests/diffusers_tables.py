"""Test helper: hand a DDPM / DDIM scheduler of diffusers our float64 ᾱ table.

diffusers keeps ᾱ in float32 (it casts even `trained_betas` to float32), whose cumulative
product differs from our float64 table by up to ~1e-5 relatively near t = T; through 1/√ᾱ (≈160
there) that alone would swamp the comparisons (measured: 1.02e-6 relative by step 18 of a 20-step DDPM chain
with diffusers' own tables, against the 1e-6 the tests hold). With ours in place the comparisons
test formulas, timesteps, clipping and where noise enters — not rounding.

There is no public way to give diffusers a float64 table, so this writes the one attribute
`step()` reads it from, `alphas_cumprod` (DDPMScheduler and DDIMScheduler, diffusers 0.42): their
β_t and α_t are re-derived from ᾱ ratios, and the ᾱ = 1 past the last step is exact in float32
(DDIM with set_alpha_to_one=False ends at `final_alpha_cumprod`, its float32 copy of ᾱ_0: that is
written too).
Should a diffusers release read another attribute, the float32 rounding shows at once as
failures of the 1e-6 comparisons, never as a silent pass."""
import torch

from fastddpm.schedule import Schedule


def with_float64_tables(scheduler, schedule: Schedule):
    assert scheduler.alphas_cumprod.shape == schedule.alphas_cumprod.shape, "another T"
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    if not getattr(scheduler.config, "set_alpha_to_one", True):  # DDIM's last ᾱ_prev: ᾱ_0, a copy
        scheduler.final_alpha_cumprod = schedule.alphas_cumprod[0].clone()
    return scheduler


def with_float64_sigmas(scheduler, schedule: Schedule, timesteps: list[int]):
    """A multistep scheduler (DPMSolverMultistep, UniPCMultistep) set to visit `timesteps` with
    our float64 σ = √((1 − ᾱ)/ᾱ) there and 0 after the last (final_sigmas_type="zero"): the two
    attributes its step() reads the grid from. set_timesteps rounds σ to float32 (UniPC also
    spaces 'leading' differently from DDPM/DDIM), so both are written after it."""
    scheduler.set_timesteps(len(timesteps))
    # where ours is 0 (t = T of a zero-terminal-SNR schedule), the scheduler's own ᾱ there: its
    # rescale_betas_zero_snr puts 2^-24, exact in float32
    ac = torch.where(schedule.alphas_cumprod == 0, scheduler.alphas_cumprod.double(),
                     schedule.alphas_cumprod)[timesteps]
    scheduler.timesteps = torch.tensor(timesteps, dtype=torch.int64)
    scheduler.sigmas = torch.cat([((1.0 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
    return scheduler
