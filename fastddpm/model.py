"""A diffusion model as a user holds it: the ε-network, its noise schedule, sampling defaults."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import UserError, is_integer, is_number
from .options import FALLBACK_SPACING, FAST_STEPS, SAFE_STEPS, SamplingOptions
from .prediction import check_prediction, for_prediction
from .samplers import SAMPLERS, VARIANCES, SamplerTable, make_table, timestep_sequence, with_clip_range
from .schedule import Schedule, ScheduleConfig
from .unet import UNet, UNetConfig
from .variance import check_channels

Grid = tuple[int, ...]  # timesteps, descending


@dataclass(frozen=True)
class SamplingDefaults:
    # σ² = β ("fixed_large", CIFAR-10) or β̃ ("fixed_small", 256²), or the network's own
    # ("learned", "learned_range": out_channels = 2 × in_channels, fastddpm/variance.py)
    variance: str = "fixed_large"
    clip: bool = True  # clip x̂0 to [−clip_range, clip_range]
    prediction: str = "epsilon"  # what the network predicts: epsilon | sample | v_prediction
    # False: DDIM's last step goes to ᾱ_0 instead of 1 (diffusers' DDIMScheduler setting; the
    # other samplers end at ᾱ = 1, as diffusers' other schedulers, which lack the key, do)
    set_alpha_to_one: bool = True
    steps_offset: int = 0  # added to the 'leading' grid's timesteps, as diffusers does
    # time grids tuned for this model (`fastddpm tune-steps`, `--spacing tuned`), one per
    # (sampler, steps), sorted: ((sampler, steps, timesteps), ...)
    grids: tuple[tuple[str, int, Grid], ...] = ()
    clip_range: float = 1.0  # diffusers' clip_sample_range (samplers.with_clip_range)

    def to_dict(self) -> dict:
        d = {"variance": self.variance, "clip": self.clip}
        if self.prediction != "epsilon":  # absent for ε: files read as before
            d["prediction"] = self.prediction
        if not self.set_alpha_to_one:  # these too are absent at their defaults
            d["set_alpha_to_one"] = False
        if self.steps_offset:
            d["steps_offset"] = self.steps_offset
        if self.clip_range != 1.0:
            d["clip_range"] = self.clip_range
        if self.grids:  # absent when empty: files without grids read as before
            d["grids"] = [{"sampler": s, "steps": n, "timesteps": list(ts)} for s, n, ts in self.grids]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingDefaults:
        unknown = set(d) - {"variance", "clip", "prediction", "set_alpha_to_one", "steps_offset", "grids",
                         "clip_range"}
        if unknown:
            raise UserError(f"unknown sampling field(s) {sorted(unknown)}")
        out = cls(**{**d, "grids": _grids_from_list(d.get("grids", []))})
        if out.variance not in VARIANCES:
            raise UserError(f"unknown variance type {out.variance!r}; choose one of {', '.join(VARIANCES)}")
        check_prediction(out.prediction)
        if not isinstance(out.set_alpha_to_one, bool):
            raise UserError(f"sampling set_alpha_to_one must be true or false, got {out.set_alpha_to_one!r}")
        check_steps_offset(out.steps_offset)
        check_clip_range(out.clip_range)
        return out

    def grid(self, sampler: str, steps: int) -> Grid | None:
        """The tuned grid for `sampler` at `steps` steps, or None."""
        return next((ts for s, n, ts in self.grids if (s, n) == (sampler, steps)), None)

    def with_grid(self, sampler: str, steps: int, timesteps: Grid) -> SamplingDefaults:
        """A copy holding `timesteps` as the tuned grid for (sampler, steps), replacing any."""
        kept = [g for g in self.grids if (g[0], g[1]) != (sampler, steps)]
        grids = sorted([*kept, (sampler, steps, tuple(int(t) for t in timesteps))])
        return replace(self, grids=tuple(grids))


def check_steps_offset(offset) -> None:
    if not is_integer(offset) or offset < 0:
        raise UserError(f"steps_offset must be an integer ≥ 0, got {offset!r}")


def check_clip_range(r, name: str = "clip_range") -> None:
    if not is_number(r) or r <= 0:  # is_number: finite, not a bool
        raise UserError(f"{name} must be a finite number > 0, got {r!r}")


def _grids_from_list(items) -> tuple[tuple[str, int, Grid], ...]:
    """Tuned grids as a model file lists them, checked (a file may say anything): each a sampler
    name, a step count and that many distinct descending timesteps ≥ 0 (≤ T is checked on use)."""
    if not isinstance(items, list):
        raise UserError("the sampling grids must be a list")
    out = {}
    for item in items:
        ok = (isinstance(item, dict) and set(item) == {"sampler", "steps", "timesteps"}
              and isinstance(item["sampler"], str) and is_integer(item["steps"]) and item["steps"] >= 1
              and isinstance(item["timesteps"], list) and len(item["timesteps"]) == item["steps"]
              and all(is_integer(t) and t >= 0 for t in item["timesteps"]))
        ts = item["timesteps"] if ok else []
        if not ok or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise UserError(f"damaged tuned grid {str(item)[:80]}: need sampler, steps and that "
                            "many descending timesteps; re-run `fastddpm tune-steps`")
        out[(item["sampler"], int(item["steps"]))] = tuple(int(t) for t in ts)
    return tuple(sorted((s, n, ts) for (s, n), ts in out.items()))


@dataclass(eq=False)
class DiffusionModel:
    unet: UNet
    schedule: Schedule
    sampling: SamplingDefaults = SamplingDefaults()

    def __post_init__(self):
        cfg = self.unet.config
        check_channels(cfg.in_channels, cfg.out_channels, self.sampling.variance, "this model")

    @classmethod
    def create(cls, unet_config: UNetConfig, schedule_config: ScheduleConfig = ScheduleConfig(),
               sampling: SamplingDefaults = SamplingDefaults()) -> DiffusionModel:
        """A freshly initialised model (random weights)."""
        return cls(UNet(unet_config), Schedule(schedule_config), sampling)

    @classmethod
    def from_weights(cls, unet_config: UNetConfig, schedule_config: ScheduleConfig,
                     sampling: SamplingDefaults, state: dict, where: str) -> DiffusionModel:
        """A model around trained weights, in eval mode (`where` names their source in errors)."""
        check_channels(unet_config.in_channels, unet_config.out_channels, sampling.variance, where)
        with torch.device("meta"):  # shapes only: a config that disagrees costs no memory
            check_weights(UNet(unet_config), state, where)
        unet = UNet(unet_config)
        unet.load_state_dict(state)
        return cls(unet.eval(), Schedule(schedule_config), sampling)

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def table(self, options: SamplingOptions | None = None, start: int | None = None,
              **choices) -> SamplerTable:
        """The coefficient table of `options`' sampler (or SamplingOptions(**choices)) over this
        model's schedule and defaults; `start=t` begins the chain at x_t."""
        options = SamplingOptions.of(options, **choices)
        extra = {}
        if "eta" in SAMPLERS[options.sampler].options:
            extra["eta"] = options.eta or 0.0
        if "variance" in SAMPLERS[options.sampler].options:
            extra["variance"] = self.sampling.variance
        if "set_alpha_to_one" in SAMPLERS[options.sampler].options:
            extra["set_alpha_to_one"] = self.sampling.set_alpha_to_one
        clip = self.sampling.clip if options.clip is None else options.clip
        steps, grid = self.plan(options)
        table = make_table(self.schedule, options.sampler, steps, grid, clip=clip, start=start, **extra)
        table = for_prediction(table, self.sampling.prediction)
        return with_clip_range(table, self.sampling.clip_range) if clip else table

    def plan(self, options: SamplingOptions) -> tuple[int, str | Grid]:
        """The step count and time grid `options` mean on this model.

        steps None: the model's T for DDPM (the paper's procedure); FAST_STEPS[sampler] where the
        model has a tuned grid there (unless another spacing is asked); SAFE_STEPS otherwise.
        spacing None: the tuned grid for (sampler, steps) where the model has one, else
        FALLBACK_SPACING; 'tuned': that grid, or a one-line error naming `fastddpm tune-steps`;
        'leading' on a model with a steps_offset: that grid shifted by it (`_leading_grid`)."""
        sampler, steps, spacing = options.sampler, options.steps, options.spacing
        T = self.schedule.num_timesteps
        if steps is None:
            fast = FAST_STEPS.get(sampler)
            if sampler == "ddpm":
                steps = T
            elif fast is not None and spacing in (None, "tuned") and self.sampling.grid(sampler, fast):
                steps = fast
            else:
                steps = min(SAFE_STEPS, T)
        grid = self.sampling.grid(sampler, steps)
        if spacing is None:
            return steps, grid or FALLBACK_SPACING
        if spacing == "leading" and self.sampling.steps_offset:
            return steps, self._leading_grid(steps)
        if spacing != "tuned":
            return steps, spacing
        if grid is None:
            raise UserError(f"this model has no tuned time grid for {sampler} at {steps} steps; make "
                            f"one with `fastddpm tune-steps MODEL --steps {steps} --sampler {sampler}`")
        return steps, grid

    def _leading_grid(self, steps: int) -> Grid:
        """The leading grid plus the model's steps_offset, as diffusers' DDPM and DDIM schedulers
        visit it. The offset must stay below the grid's stride T // steps: diffusers' last step
        would otherwise go to t = offset − stride ≥ 0 and end short of x_0 (or past T − 1)."""
        grid = timestep_sequence(self.schedule, steps, "leading")
        offset, T = self.sampling.steps_offset, self.schedule.num_timesteps
        if offset >= T // steps:
            raise UserError(f"steps_offset={offset} needs a leading grid whose stride T // steps "
                            f"exceeds it; {steps} steps of {T} have stride {T // steps} (fewer "
                            "steps, or another --spacing)")
        return tuple(t + offset for t in grid)


def check_weights(unet: torch.nn.Module, state: dict, where: str) -> None:
    """A one-line error naming the first missing, unexpected, mis-shaped or non-finite weight."""
    expected = unet.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise UserError(f"{where}: weight {key!r} is not a floating-point tensor")
    for key, value in expected.items():
        if key not in state:
            raise UserError(f"{where}: missing weight {key!r}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{where}: weight {key!r} has shape {tuple(state[key].shape)}, "
                            f"the config needs {tuple(value.shape)}")
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"{where}: unexpected weight {key!r}")
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"{where}: weight {key!r} holds NaN or infinite values; the file is "
                            "damaged (or the training diverged)")

