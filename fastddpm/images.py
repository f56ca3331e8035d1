"""Images out: [−1, 1] tensors → uint8, PNG grids, a folder of PNGs, or an .npz array."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .files import atomic_folder, atomic_write, check_writable_folder_target, check_writable_target

FORMATS = ("png", "npz", "folder")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [−1, 1] → (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """One image tiling all of `images` (N, C, H, W), `nrow` per row (default ≈ √N)."""
    return _grid_uint8(to_uint8(images), nrow, pad)


def _grid_uint8(arr: np.ndarray, nrow: int | None, pad: int = 2) -> Image.Image:
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = arr[k]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def output_format(path: str | Path) -> str:
    """'png' for *.png, 'npz' for *.npz, 'folder' for a path ending in '/' or an existing folder."""
    p = str(path)
    if p.endswith("/") or Path(p).is_dir():
        return "folder"
    suffix = Path(p).suffix.lower()
    if suffix == ".png":
        return "png"
    if suffix == ".npz":
        return "npz"
    raise UserError(f"cannot tell the output format of {p!r}: end it in .png (a grid), "
                    ".npz (an array) or / (a folder of PNGs)")


def check_output(path: str | Path) -> str:
    """Validate the output target before any sampling work; returns its format."""
    if not str(path):
        raise UserError("the output path is empty; give a .png, .npz or folder/ name")
    fmt = output_format(path)
    if fmt == "folder":
        check_writable_folder_target(str(path).rstrip("/") or "/")
    else:
        check_writable_target(path)
    return fmt


def save(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Write `images` to `path` in the format its name says (see `output_format`); a PNG grid
    has `nrow` images per row (default ≈ √N)."""
    save_uint8(to_uint8(images), path, nrow)


def save_uint8(arr: np.ndarray, path: str | Path, nrow: int | None = None) -> None:
    """`save` for images already quantised: (N, H, W, C) uint8, as `to_uint8` gives."""
    fmt = check_output(path)
    if fmt == "png":
        with atomic_write(path) as tmp:
            _grid_uint8(arr, nrow).save(tmp, format="PNG")
    elif fmt == "npz":
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=arr)
    else:
        # built beside and swapped in whole: two runs never mix, no stale image stays
        with atomic_folder(str(path).rstrip("/")) as folder:
            for k, one in enumerate(arr):
                Image.fromarray(one[..., 0] if one.shape[-1] == 1 else one).save(
                    folder / f"{k:06d}.png", format="PNG")
