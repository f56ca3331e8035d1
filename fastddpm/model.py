"""A diffusion model as a user holds it: the ε-network, its noise schedule, sampling defaults."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .options import SamplingOptions
from .prediction import check_prediction, for_prediction
from .samplers import SAMPLERS, VARIANCES, SamplerTable, make_table
from .schedule import Schedule, ScheduleConfig
from .unet import UNet, UNetConfig


@dataclass(frozen=True)
class SamplingDefaults:
    variance: str = "fixed_large"  # σ² = β ("fixed_large", CIFAR-10) or β̃ ("fixed_small", 256²)
    clip: bool = True  # clip x̂0 to [−1, 1]
    prediction: str = "epsilon"  # what the network predicts: epsilon | sample | v_prediction

    def to_dict(self) -> dict:
        d = {"variance": self.variance, "clip": self.clip}
        if self.prediction != "epsilon":  # absent for ε: files read as before
            d["prediction"] = self.prediction
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingDefaults:
        unknown = set(d) - {"variance", "clip", "prediction"}
        if unknown:
            raise UserError(f"unknown sampling field(s) {sorted(unknown)}")
        out = cls(**d)
        if out.variance not in VARIANCES:
            raise UserError(f"unknown variance type {out.variance!r}; choose one of {', '.join(VARIANCES)}")
        check_prediction(out.prediction)
        return out


@dataclass(eq=False)
class DiffusionModel:
    unet: UNet
    schedule: Schedule
    sampling: SamplingDefaults = SamplingDefaults()

    @classmethod
    def create(cls, unet_config: UNetConfig, schedule_config: ScheduleConfig = ScheduleConfig(),
               sampling: SamplingDefaults = SamplingDefaults()) -> DiffusionModel:
        """A freshly initialised model (random weights)."""
        return cls(UNet(unet_config), Schedule(schedule_config), sampling)

    @classmethod
    def from_weights(cls, unet_config: UNetConfig, schedule_config: ScheduleConfig,
                     sampling: SamplingDefaults, state: dict, where: str) -> DiffusionModel:
        """A model around trained weights, in eval mode (`where` names their source in errors)."""
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
        clip = self.sampling.clip if options.clip is None else options.clip
        table = make_table(self.schedule, options.sampler, options.steps, options.spacing,
                           clip=clip, start=start, **extra)
        return for_prediction(table, self.schedule.alphas_cumprod, self.sampling.prediction)


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

