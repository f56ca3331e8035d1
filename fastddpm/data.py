"""Training data as float32 tensors (N, C, S, S) in [−1, 1].

Built in: `digits`, the 1,797 8×8 handwritten digits scikit-learn ships (16 grey levels),
upsampled to the model size, with a fixed, seeded held-out split. From the user: a folder of
PNG/JPEG images, CIFAR-10's python batches (`data_batch_*` to train on, `test_batch` held out),
or an `.npz` array. Bad data is refused with one line before any training starts.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import UserError, require_extra

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
HELDOUT_FRACTION = 1 / 6
SPLIT_SEED = 0  # fixed, so the held-out digits never change between runs and evaluations


@dataclass
class Dataset:
    train: torch.Tensor  # (N, C, S, S) float32 in [−1, 1]
    heldout: torch.Tensor  # (M, C, S, S), possibly empty
    labels_train: torch.Tensor | None = None  # (N,) int64, where the source has labels
    labels_heldout: torch.Tensor | None = None


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] → (N, C, size, size): centre-crop to a square, then resize."""
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=s > size, align_corners=False)
    return x.clamp(0, 1)


def _split(x: torch.Tensor, labels: torch.Tensor | None) -> Dataset:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_held = int(round(len(x) * HELDOUT_FRACTION))
    held, train = perm[:n_held], perm[n_held:]
    return Dataset(x[train], x[held], None if labels is None else labels[train],
                   None if labels is None else labels[held])


def digits(size: int = 16) -> Dataset:
    """scikit-learn's digits, (1797, 1, size, size), split 5:1 train:held-out (seeded)."""
    datasets = require_extra("sklearn.datasets", "train", "the built-in digits data set")
    d = datasets.load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = _resize(x, size) * 2 - 1
    return _split(x, torch.from_numpy(d.target.astype(np.int64)))


def _from_uint8(arr: np.ndarray, size: int, channels: int, where: str) -> torch.Tensor:
    """(N, H, W[, C]) or (N, C, H, W) uint8/float array → (N, channels, size, size) in [−1, 1]."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UserError(f"{where}: expected images as (N, H, W[, C]), got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3) and arr.shape[1] in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != channels:
        raise UserError(f"{where}: images have {arr.shape[-1]} channels, the model wants {channels}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    if arr.dtype == np.uint8:
        x = x / 255.0
    elif not torch.isfinite(x).all() or x.min() < -1 or x.max() > 1:
        raise UserError(f"{where}: float images must lie in [0, 1] or [−1, 1] (or be uint8 0..255)")
    elif x.min() < 0:
        x = (x + 1) / 2
    return _resize(x, size) * 2 - 1


def _read_image_files(files: list[Path], size: int, channels: int, where: str) -> torch.Tensor:
    """PNG/JPEG files, each centre-cropped to a square and resized."""
    if not files:
        raise UserError(f"{where} holds no PNG or JPEG images")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                s = min(im.size)  # centre-crop to a square, then resize: one rule for all sizes
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {f}: {e}") from None
    return _from_uint8(np.stack(images), size, channels, where)


def _is_cifar(path: Path) -> bool:
    return any(path.glob("data_batch_*")) or (path / "test_batch").is_file()


def _cifar_batches(files: list[Path], size: int, channels: int) -> torch.Tensor:
    parts = []
    for b in files:
        try:
            with open(b, "rb") as f:
                # CIFAR's own format is a pickle of plain dicts and arrays: refuse anything else
                d = _RestrictedUnpickler(f, encoding="bytes").load()
            parts.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise UserError(f"{b} is not a CIFAR-10 python batch ({e})") from None
    if not parts:
        return torch.empty(0, channels, size, size)
    return _from_uint8(np.concatenate(parts), size, channels, str(files[0].parent))


def _cifar(path: Path, size: int, channels: int) -> Dataset:
    """data_batch_* are the training split; test_batch, where present, is the held-out one (the
    paper's train / test), else a sixth of the training batches is held out."""
    train = _cifar_batches(sorted(path.glob("data_batch_*")), size, channels)
    if not (path / "test_batch").is_file():
        return _split(train, None)
    return Dataset(train, _cifar_batches([path / "test_batch"], size, channels))


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy arrays and builtins: a CIFAR batch needs nothing else, and nothing can run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load(source: str, size: int, channels: int) -> Dataset:
    """`digits`, a folder of images, a CIFAR-10 python folder, or an .npz file (key `images`
    or the only array), as a Dataset at `size`² with `channels` channels."""
    if source == "digits":
        if channels != 1:
            raise UserError(f"the digits are greyscale; the model wants {channels} channels")
        return digits(size)
    path = _existing(source)
    if path.is_dir() and _is_cifar(path):
        return _cifar(path, size, channels)
    return _split(_user_images(path, size, channels), None)


def images(source: str, size: int, channels: int) -> torch.Tensor:
    """Images to start a chain from: a user's own in full (a PNG/JPEG file, a folder of them, an
    .npz), or the held-out split of a data set (`digits`, a CIFAR-10 folder: images no model
    trained on). (N, channels, size, size) float32 in [−1, 1]."""
    path = Path(source)
    if source == "digits" or (path.is_dir() and _is_cifar(path)):
        return load(source, size, channels).heldout
    return _user_images(_existing(source), size, channels)


def _existing(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise UserError(f"data {source} not found; pass 'digits', a folder of images, a CIFAR-10 "
                        "python folder, an image or an .npz file")
    return path


def _user_images(path: Path, size: int, channels: int) -> torch.Tensor:
    """A folder of PNG/JPEG images, one such image, or an .npz file, all of it."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return _read_image_files(files, size, channels, str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image_files([path], size, channels, str(path))
    if path.suffix != ".npz":
        raise UserError(f"{path}: unsupported data file; use a folder of images, an image or an "
                        ".npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise UserError(f"{path} holds several arrays {keys}; name the images 'images'")
            arr = z[key]
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return _from_uint8(arr, size, channels, str(path))
