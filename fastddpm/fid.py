"""FID and Inception Score over InceptionV3 features (fastddpm.inception), computed so that the
work can be spread over the ranks of a torchrun job.

FID needs only three sums over the samples' features f (N, 2048): the count N, Σ f and Σ f fᵀ,
accumulated in float64. Ranks add theirs with one all_reduce each (as NVlabs EDM's fid.py does),
and μ = Σf/N, Σ = (Σffᵀ − N μμᵀ)/(N − 1) is the unbiased covariance torch-fidelity's numpy.cov
gives. FID = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), the trace of the root taken as the sum of
the square roots of the eigenvalues of Σ₁Σ₂ (torch-fidelity's way, no sqrtm).

IS = exp E_x KL(p(y|x) ‖ p(y)) over 10 splits of the samples, shuffled with seed 2020, from the
1008 unbiased logits (torch-fidelity's defaults): it needs every sample's logits, which ranks
gather in sample order.

Reference statistics (μ, Σ of a data set) are cached as an .npz keyed by the reference images'
bytes and the Inception weights' digest.
"""
from __future__ import annotations

import hashlib
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .disk_cache import cache_root
from .distributed import Distributed
from .errors import UserError
from .files import atomic_write
from .inception import Inception

IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020


class FeatureSums:
    """Count, Σf (D,) and Σffᵀ (D, D) of the features seen so far, float64 on `device`."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        """features: (N, D) float64."""
        self.count += len(features)
        self.total += features.sum(0)
        self.outer += features.T @ features

    def reduce(self, ctx: Distributed) -> None:
        """Add up every rank's sums (each rank then holds the whole job's)."""
        for t in (self.count, self.total, self.outer):
            ctx.all_reduce_sum(t)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """μ (D,) and the unbiased covariance Σ (D, D), float64."""
        n = int(self.count.item())
        if n < 2:
            raise UserError(f"a covariance of Inception features needs at least 2 samples, got {n}; "
                            "measure more images (the paper's FID uses 50,000)")
        mu = self.total.cpu().numpy() / n
        sigma = (self.outer.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between two Gaussians (float64 in, Python float out)."""
    diff = mu1 - mu2
    root_trace = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * root_trace)


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS,
                    seed: int = IS_SHUFFLE_SEED) -> tuple[float, float]:
    """(mean, std) over `splits` of exp E KL(p(y|x) ‖ p(y)); logits (N, C) in sample order."""
    n = len(logits)
    if n < splits:
        raise UserError(f"the Inception Score averages {splits} splits and needs at least {splits} "
                        f"samples, got {n}")
    logits = logits.double()[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = part.exp().mean(0).log()
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def read_images(source: str) -> np.ndarray:
    """(N, H, W, C) uint8 from an .npz (key `images`, as `fastddpm sample` writes), a folder of
    PNG/JPEG files of one size (read as they are: grey stays grey), or a CIFAR-10 python folder
    (its 50,000 training images)."""
    from PIL import Image, UnidentifiedImageError

    from . import data
    from .images import to_uint8

    path = Path(source)
    if not path.exists():
        raise UserError(f"{source} not found; give an .npz of images, a folder of PNGs, or a "
                        "CIFAR-10 python folder")
    if path.is_dir() and data._is_cifar(path):
        return to_uint8(data.load(str(path), 32, 3).train)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise UserError(f"{source} holds no PNG or JPEG images")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {f}: {e}") from None
            arrays.append(arr[..., None] if arr.ndim == 2 else arr)
        if len({a.shape for a in arrays}) > 1:
            raise UserError(f"the images in {source} differ in size or channels; FID takes one kind")
        return np.stack(arrays)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise UserError(f"{source} has no 'images' array (it has {', '.join(f.files) or 'none'})")
            arr = f["images"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # not an .npz, truncated, objects
        raise UserError(f"{source} is not a readable .npz of images ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(f"{source}: expected uint8 images (N, H, W, 1|3), got {arr.dtype} {arr.shape}")
    return arr


def _read_statistics(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """μ, Σ from an .npz that holds them (ours, torch-fidelity's, pytorch-fid's); None when the
    file holds no `mu`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f:
                return None
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except KeyError:
        raise UserError(f"{path} has `mu` but no `sigma`; reference statistics need both") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz ({e})") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UserError(f"{path}: statistics must be mu ({dim},) and sigma ({dim}, {dim}) for "
                        f"{dim}-dimensional features, got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: the statistics hold NaN or infinite values")
    return mu, sigma


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, count=np.int64(count))


@dataclass
class Reference:
    """What FID compares with: given statistics, or images whose statistics are measured once
    and cached, keyed by the images' bytes and the Inception weights."""
    source: str
    given: tuple[np.ndarray, np.ndarray] | None = None
    images: np.ndarray | None = None

    @classmethod
    def open(cls, ref: str, dim: int) -> Reference:
        """Read `ref` (no Inception needed yet, so a bad reference fails in a moment): a
        statistics .npz (mu, sigma), or images `read_images` takes."""
        if ref.startswith("cifar10-"):
            raise UserError(f"{ref}: fastddpm downloads no data set; pass the CIFAR-10 python "
                            "folder (cifar-10-batches-py, from cifar-10-python.tar.gz) as --ref DIR: "
                            "its 50,000 training images are the reference")
        path = Path(ref)
        if path.is_file() and path.suffix == ".npz":
            given = _read_statistics(path, dim)
            if given is not None:
                return cls(ref, given=given)
        return cls(ref, images=read_images(ref))

    def statistics(self, net: Inception, ctx: Distributed,
                   chunk: int) -> tuple[np.ndarray, np.ndarray, int | None, str]:
        """μ, Σ, the number of images they came from (None when a statistics file does not
        say), and where they came from (the file, the cache, or computed now)."""
        if self.given is not None:
            return (*self.given, None, "statistics file")
        images = self.images
        key = hashlib.sha256(f"{images.shape}:{net.dims}:{net.digest}".encode()
                             + images.tobytes()).hexdigest()
        cached = cache_root() / "fid" / f"ref-{key[:32]}.npz"
        hit = None
        if ctx.main and cached.is_file():
            with np.load(cached, allow_pickle=False) as f:
                hit = f["mu"], f["sigma"]
        hit = ctx.broadcast_from_main(hit)  # rank 0's cache decides for all: no split collectives
        if hit is not None:
            return (*hit, len(images), f"cache {cached}")
        sums = FeatureSums(net.dims, net.device)
        chunks = [(first, min(chunk, len(images) - first)) for first in range(0, len(images), chunk)]
        for first, n in chunks[ctx.rank::ctx.world]:
            sums.add(net.features(images[first:first + n])[0])
        sums.reduce(ctx)
        mu, sigma = sums.statistics()
        if ctx.main:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                save_statistics(cached, mu, sigma, len(images))
            except (OSError, UserError) as e:  # a read-only home: measure, just don't keep
                print(f"note: reference statistics not cached ({e})", file=sys.stderr)
        return mu, sigma, len(images), "computed"


def gather_in_order(parts: list[torch.Tensor], chunks: list[tuple[int, int]],
                    ctx: Distributed) -> torch.Tensor:
    """Rows each rank computed for its chunks (every W-th of `chunks`, in order), as one tensor in
    chunk order on every rank."""
    mine = torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)
    if ctx.world == 1:
        return mine
    width = int(ctx.all_reduce_max(torch.tensor([mine.shape[1]])).item())
    rows = sum(n for _, n in chunks[ctx.rank::ctx.world])
    most = max(sum(n for _, n in chunks[r::ctx.world]) for r in range(ctx.world))
    padded = torch.zeros(most, width, dtype=torch.float64, device=ctx.collective_device)
    padded[:rows] = mine.to(ctx.collective_device).reshape(rows, width)
    everyone = [p.cpu() for p in ctx.all_gather(padded)]
    taken = [0] * ctx.world
    ordered = []
    for k, (_, n) in enumerate(chunks):
        r = k % ctx.world
        ordered.append(everyone[r][taken[r]:taken[r] + n])
        taken[r] += n
    return torch.cat(ordered)
