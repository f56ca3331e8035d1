"""Training data as float32 tensors (N, C, S, S) in [−1, 1].

Built in: `digits`, the 1,797 8×8 handwritten digits scikit-learn ships (16 grey levels),
upsampled to the model size, with a fixed, seeded held-out split. From the user: a folder of
PNG/JPEG images, CIFAR-10's python batches (`data_batch_*` to train on, `test_batch` held out),
or an `.npz` array. Bad data is refused with one line before any training starts.
"""
from __future__ import annotations

import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError, require_extra
from .limits import check_fits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_FORMATS = ("PNG", "JPEG")
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


def _check_images_shape(shape: tuple[int, ...], where: str) -> None:
    """(N, H, W) or (N, H, W, C) / (N, C, H, W), nothing empty."""
    if len(shape) not in (3, 4):
        raise UserError(f"{where}: expected images as (N, H, W[, C]), got shape {shape}")
    if 0 in shape:
        raise UserError(f"{where} holds no images (array of shape {shape})")


def _from_uint8(arr: np.ndarray, size: int, channels: int, where: str) -> torch.Tensor:
    """(N, H, W[, C]) or (N, C, H, W) uint8/float array → (N, channels, size, size) in [−1, 1]."""
    _check_images_shape(arr.shape, where)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[-1] not in (1, 3) and arr.shape[1] in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != channels:
        raise UserError(f"{where}: images have {arr.shape[-1]} channels, the model wants {channels}")
    # native byte order, float32 for all but uint8 (torch takes neither big-endian nor every
    # integer width), and writable (an array read from a file's bytes is not)
    arr = np.require(arr, np.uint8 if arr.dtype == np.uint8 else np.float32, ["C", "W"])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
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
            # PNG and JPEG decoders alone: a file named .png is never parsed as another format
            with Image.open(f, formats=IMAGE_FORMATS) as im:
                if im.width * im.height > Image.MAX_IMAGE_PIXELS:  # read lazily: nothing decoded yet
                    raise UserError(f"image {f} is {im.width}×{im.height} pixels, more than the "
                                    f"{Image.MAX_IMAGE_PIXELS} read here (a decompression bomb?)")
                im = im.convert(mode)
                s = min(im.size)  # centre-crop to a square, then resize: one rule for all sizes
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8))
        # what PIL raised on 20,000 truncated and bit-flipped PNGs and JPEGs: OSError (with
        # UnidentifiedImageError), SyntaxError and ValueError from its chunk parsers; and its
        # refusal of a header asking for over twice MAX_IMAGE_PIXELS
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {f}: {str(e)[:200] or type(e).__name__}") from None
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
        except OSError as e:  # a folder of that name, no permission
            raise UserError(f"cannot read {b}: {e.strerror}") from None
        # what the unpickler raises on damaged data (Python's docs name AttributeError, EOFError,
        # ImportError, IndexError; 6,000 truncated and bit-flipped batches added the rest: opcodes
        # applied to the wrong objects, a memo key or length field past anything in the file)
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, AttributeError,
                TypeError, OverflowError, MemoryError) as e:
            raise UserError(f"{b} is not a CIFAR-10 python batch ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
        images = d.get(b"data") if isinstance(d, dict) else None
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.size % 3072:
            raise UserError(f"{b} is not a CIFAR-10 python batch (no uint8 array of 32×32 colour "
                            "images under b'data')")
        parts.append(images.reshape(-1, 3, 32, 32))
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
    return _from_uint8(_read_npz(path), size, channels, str(path))


def _read_npz(path: Path) -> np.ndarray:
    """The array `images` of an .npz (or its only array), its header checked before its data is
    read: numbers only (nothing pickled), the shape of images, a size the file and the machine
    can hold."""
    try:
        with zipfile.ZipFile(path) as z:
            members = {name.removesuffix(".npy"): name for name in z.namelist()}
            if not members:
                raise UserError(f"{path} holds no arrays")
            key = "images" if "images" in members else next(iter(members)) if len(members) == 1 else None
            if key is None:
                raise UserError(f"{path} holds several arrays {sorted(members)}; name the images 'images'")
            where = f"{path} ({key})"
            with z.open(members[key]) as f:
                shape, fortran_order, dtype = _npy_header(f, where)
                _check_images_shape(shape, where)
                nbytes = math.prod(shape) * dtype.itemsize
                stored = z.getinfo(members[key]).file_size - f.tell()
                if nbytes > stored:
                    raise UserError(f"{where}: truncated (its header says {shape} {dtype}, "
                                    f"{nbytes} bytes; the file holds {stored})")
                # the array, a float32 copy of it, the resized copy
                check_fits(f"reading {where}", nbytes + 2 * 4 * math.prod(shape), "use a smaller file")
                raw = f.read(nbytes)
                if len(raw) != nbytes:
                    raise UserError(f"{where}: truncated ({len(raw)} of {nbytes} bytes)")
                return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran_order else "C")
    # what numpy and zipfile raised on truncated, bit-flipped and crafted files: a damaged zip
    # (BadZipFile, a zlib error, EOF, a compression method zipfile lacks: NotImplementedError),
    # a header or data short or inconsistent (ValueError)
    except (OSError, EOFError, ValueError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"cannot read {path}: {str(e)[:200] or type(e).__name__}") from None


def _npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream, left at its data; plain numbers only."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise UserError(f"{where}: .npy format {version} holds structured data, not images")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if dtype.kind not in "uif" or dtype.fields is not None or dtype.subdtype is not None:
        raise UserError(f"{where}: images must be numbers (uint8, or floats in [0, 1] or [-1, 1]), "
                        f"not {dtype}")
    return shape, fortran_order, dtype
