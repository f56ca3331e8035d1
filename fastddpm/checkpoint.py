"""Model files: `model.pt` (torch, read with weights_only=True) and `.safetensors` (config in the
metadata). Both hold a format tag and version, the U-Net config, the schedule, the sampling
defaults and the weights. Writes go to a temp file in the same folder and are renamed into place,
so a crash never leaves a half-written model where a good one was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import UserError, is_integer
from .files import atomic_write, read_torch_file
from .interop import from_state_dict, load_folder
from .model import DiffusionModel, SamplingDefaults
from .schedule import ScheduleConfig
from .unet import UNetConfig

FORMAT = "fastddpm"
VERSION = 1
DEFAULT_NAME = "default"
DEFAULT_ASSET = "digits.safetensors"


def default_model_path() -> Path:
    # beside this module in a wheel and in an editable install alike (importlib.resources
    # trips over the editable finder when the folder is missing)
    return Path(__file__).resolve().parent / "assets" / DEFAULT_ASSET


def _header(model: DiffusionModel) -> dict:
    return {"format": FORMAT, "version": VERSION, "unet": model.config.to_dict(),
            "schedule": model.schedule.config.to_dict(), "sampling": model.sampling.to_dict()}


def save(model: DiffusionModel, path: str | os.PathLike) -> None:
    """Write `model` to `path`: safetensors if it ends in .safetensors, else a torch file."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}
    try:
        with atomic_write(path) as tmp:
            if str(path).endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(state, str(tmp), metadata={FORMAT: json.dumps(_header(model))})
            else:
                torch.save({**_header(model), "state_dict": state}, tmp)
    except PermissionError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose a writable path") from None


def from_parts(header: dict, state: dict, where: str) -> DiffusionModel:
    """Build a model from a header dict and a state dict, with one-line errors for mismatches."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{where} is not a fastddpm model file; convert it with `fastddpm convert`")
    if not is_integer(header.get("version", 0)):
        raise UserError(f"{where} has a damaged header (version {header['version']!r}); re-export "
                        "or re-train the model")
    if header.get("version", 0) > VERSION:
        raise UserError(f"{where} was written by a newer fastddpm (format version "
                        f"{header['version']}); upgrade fastddpm")
    try:
        return DiffusionModel.from_weights(UNetConfig.from_dict(header["unet"]),
                                           ScheduleConfig.from_dict(header["schedule"]),
                                           SamplingDefaults.from_dict(header.get("sampling", {})),
                                           state, where)
    except (KeyError, TypeError) as e:
        raise UserError(f"{where} has a damaged header ({e}); re-export or re-train the model") from None


def _read_torch(path: Path) -> tuple[dict | None, dict]:
    """(header, state dict); header None for a bare state dict (someone else's layout)."""
    obj = read_torch_file(path)
    if isinstance(obj, dict) and obj and "state_dict" not in obj \
            and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None, obj
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"{path} is not a fastddpm model file; convert it with `fastddpm convert`")
    state = obj.pop("state_dict")
    return obj, state


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e)[:120]})") from None
    if FORMAT not in meta:
        raise UserError(f"{path} has no fastddpm config in its metadata; "
                        "convert it with `fastddpm convert`")
    try:
        header = json.loads(meta[FORMAT])
    except json.JSONDecodeError:
        raise UserError(f"{path} has a damaged fastddpm header; re-export the model") from None
    return header, state


def load(path: str | os.PathLike = DEFAULT_NAME, device: str | torch.device = "cpu") -> DiffusionModel:
    """Read a model onto `device`, in eval mode: a model file, `default` (the bundled digits
    model), a diffusers UNet2DModel / DDPM pipeline folder, or a bare state dict in the layout of
    the original DDPM checkpoints' PyTorch port (see fastddpm.interop)."""
    if str(path) == DEFAULT_NAME:
        path = default_model_path()
        if not path.is_file():
            raise UserError("the bundled default model is missing from this install; "
                            "reinstall fastddpm or give a model file")
    path = Path(path)
    if path.is_dir():  # a diffusers model or pipeline folder
        model = load_folder(path)
    else:
        model = _load_file(path)
    model.unet.to(device)
    return model


def _load_file(path: Path) -> DiffusionModel:
    if not path.is_file():
        raise UserError(f"model file {path} not found; give a model file, a diffusers folder "
                        "or 'default' (the bundled model)")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read model file {path}: permission denied")
    header, state = (_read_safetensors if path.suffix == ".safetensors" else _read_torch)(path)
    if header is None:  # a bare state dict, e.g. the original DDPM checkpoints' PyTorch port
        return from_state_dict(state, str(path))
    return from_parts(header, state, str(path))
