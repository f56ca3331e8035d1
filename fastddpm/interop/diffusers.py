"""diffusers folders ↔ our models.

Reads the three layouts diffusers uses for unconditional DDPMs: a `UNet2DModel` folder
(config.json + diffusion_pytorch_model.safetensors or .bin), a pipeline folder (model_index.json
+ unet/ + scheduler/), and the flat layout of the google/ddpm-* repositories (model_index.json,
config.json, the weights and scheduler_config.json side by side). Writes the flat layout: both
`UNet2DModel.from_pretrained(dir)` and `DDPMPipeline.from_pretrained(dir)` (`DDIMPipeline` for
a model whose DDIM ends at ᾱ_0, written with a DDIMScheduler) read it, since diffusers loads a
pipeline component from the root when its subfolder is absent.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_folder, read_torch_file
from ..model import DiffusionModel
from ..schedule import ScheduleConfig
from ..unet import UNetConfig
from ..variance import check_channels
from .diffusers_config import (
    DIFFUSERS_VERSION,
    schedule_from_diffusers,
    schedule_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from .names import DIFFUSERS, our_shapes, param_map, to_ours, to_theirs

WEIGHTS = "diffusion_pytorch_model"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_INDEX = "model_index.json"
PIPELINE_COMPONENTS = {"unet": "UNet2DModel", "scheduler": None}  # None: any class we can read
# an existing output folder holding one of these is a model folder we may replace

# diffusers before 0.15 named attention parameters query/key/value/proj_attn
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def _locate(folder: Path) -> tuple[Path, Path | None]:
    """(folder holding the U-Net's config.json, scheduler_config.json or None)."""
    if (folder / PIPELINE_INDEX).is_file():
        index = _read_json(folder / PIPELINE_INDEX)
        pipeline = index.get("_class_name", "pipeline")
        for name, entry in index.items():
            if name.startswith("_") or entry in (None, [None, None]):
                continue
            cls = entry[-1] if isinstance(entry, list) and entry else entry
            if name not in PIPELINE_COMPONENTS:
                raise UserError(f"{folder}: {pipeline} has a {name!r} component ({cls}) that is not "
                                "supported; fastddpm runs unconditional pipelines: unet + scheduler")
            if PIPELINE_COMPONENTS[name] not in (None, cls):
                raise UserError(f"{folder}: {pipeline}'s {name} is a {cls}, which is not "
                                f"supported; fastddpm runs a {PIPELINE_COMPONENTS[name]}")
        if "unet" not in index:
            raise UserError(f"{folder}: {PIPELINE_INDEX} names no unet")
        unet = folder / "unet" if (folder / "unet").is_dir() else folder
        sched = folder / "scheduler" / SCHEDULER_CONFIG
        if not sched.is_file():
            sched = folder / SCHEDULER_CONFIG
        return unet, sched if sched.is_file() else None
    if (folder / UNET_CONFIG).is_file():
        sched = folder / SCHEDULER_CONFIG
        sibling = folder.parent / "scheduler" / SCHEDULER_CONFIG  # the unet/ of a pipeline
        if not sched.is_file() and folder.name == "unet" and sibling.is_file():
            sched = sibling
        return folder, sched if sched.is_file() else None
    raise UserError(f"{folder} is a folder without {UNET_CONFIG} or {PIPELINE_INDEX}; pass a "
                    "diffusers model or pipeline folder, or a model file")


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safetensors, pickled = folder / f"{WEIGHTS}.safetensors", folder / f"{WEIGHTS}.bin"
    if safetensors.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors), device="cpu"), safetensors
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{safetensors} is not a readable safetensors file ({str(e)[:120]})") from None
    if pickled.is_file():
        state = read_torch_file(pickled)  # weights_only: a pickle that holds code is refused
        if not isinstance(state, dict):
            raise UserError(f"{pickled} does not hold a state dict")
        return state, pickled
    if any(folder.glob(f"{WEIGHTS}*.index.json")):
        raise UserError(f"{folder}: sharded weights are not supported; save the U-Net unsharded")
    raise UserError(f"{folder}: no weights ({WEIGHTS}.safetensors or {WEIGHTS}.bin)")


def _check_agreement(unet: UNetConfig, unet_timesteps: int | None, schedule: ScheduleConfig,
                     variance: str, folder: Path) -> None:
    """A U-Net and a scheduler that cannot run together: one line naming what disagrees."""
    if unet_timesteps is not None and unet_timesteps != schedule.num_timesteps:
        raise UserError(f"{folder}: the unet says num_train_timesteps={unet_timesteps}, the "
                        f"scheduler {schedule.num_timesteps}; fix one of the two configs")
    check_channels(unet.in_channels, unet.out_channels, variance, str(folder))


def load_folder(folder: str | Path) -> DiffusionModel:
    """A model from a diffusers UNet2DModel, pipeline or flat google/ddpm-* folder.
    Everything is validated before any weight is read."""
    folder = Path(folder)
    unet_dir, sched_path = _locate(folder)
    config_path = unet_dir / UNET_CONFIG
    if not config_path.is_file():
        raise UserError(f"{unet_dir}: no {UNET_CONFIG}")
    unet_json = _read_json(config_path)
    unet_config = unet_config_from_diffusers(unet_json, str(config_path))
    schedule, sampling = schedule_from_diffusers(
        _read_json(sched_path) if sched_path else None, str(sched_path))
    _check_agreement(unet_config, unet_json.get("num_train_timesteps"), schedule, sampling.variance,
                     folder)
    state, weights_path = _read_weights(unet_dir)
    state = {_LEGACY_ATTENTION.sub(lambda m: m[1] + _LEGACY_NAMES[m[2]] + ".", k): v
             for k, v in state.items()}
    shapes = our_shapes(unet_config)
    params = param_map(shapes, DIFFUSERS, len(unet_config.channel_mult))
    ours = to_ours(state, params, shapes, str(weights_path))
    return DiffusionModel.from_weights(unet_config, schedule, sampling, ours, str(folder))


def save_folder(model: DiffusionModel, folder: str | Path) -> Path:
    """Write `model` as a flat diffusers folder (see the module docstring), atomically."""
    from safetensors.torch import save_file

    cfg = model.config
    unet_json = unet_config_to_diffusers(cfg)  # refuses what diffusers cannot express, first
    state = model.unet.state_dict()
    theirs = to_theirs(state, param_map(state, DIFFUSERS, len(cfg.channel_mult)))
    scheduler = schedule_to_diffusers(model.schedule.config, model.sampling)
    kind = scheduler["_class_name"]  # DDPMScheduler, or DDIMScheduler (schedule_to_diffusers)
    index = {"_class_name": kind.replace("Scheduler", "Pipeline"), "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", kind], "unet": ["diffusers", "UNet2DModel"]}
    with atomic_folder(folder) as tmp:
        save_file(theirs, str(tmp / f"{WEIGHTS}.safetensors"), metadata={"format": "pt"})
        for name, data in ((UNET_CONFIG, unet_json), (SCHEDULER_CONFIG, scheduler),
                           (PIPELINE_INDEX, index)):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    return Path(folder)
