"""fastddpm: a fast runtime for denoising diffusion probabilistic models (Ho et al. 2020)."""
from .checkpoint import load, save
from .errors import UserError
from .model import DiffusionModel, SamplingDefaults
from .options import SamplingOptions
from .pipeline import Pipeline
from .runtime import Sampler, sample
from .samplers import make_table
from .schedule import Schedule, ScheduleConfig
from .unet import CONFIGS, UNet, UNetConfig

__all__ = ["CONFIGS", "DiffusionModel", "Pipeline", "Sampler", "SamplingDefaults", "SamplingOptions",
           "Schedule", "ScheduleConfig", "UNet", "UNetConfig", "UserError", "load", "make_table", "sample",
           "save"]
__version__ = "0.1.0"
