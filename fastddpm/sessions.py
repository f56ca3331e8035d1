"""Long-lived sessions: what sampling builds is kept for the process, so a second `sample()` call
pays no conversion, compilation, export or CUDA-graph capture.

Two bounded LRU caches: ε engines keyed by (model content, backend, device, dtype, threads,
quantization), and
Samplers (their tables and CUDA graphs) keyed by (model content, options, start). "Model content"
is `model_hash`: a SHA-256 over the configs and every weight's bytes, computed once per model
object and kept until a weight changes (a tensor's version counter moves with every in-place
write, load_state_dict's included; writes through `.data` bypass it — call `clear()` after those).
So loading the same file twice hits the cache, and a model changed in place misses it.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

import torch

from .backends import Denoiser, get_backend, make_denoiser, resolve_threads

if TYPE_CHECKING:
    from .model import DiffusionModel

T = TypeVar("T")
_hashes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unet → (fingerprint, weights digest)


def _fingerprint(unet: torch.nn.Module) -> tuple:
    """What changes when a weight does, read without touching the weights' bytes."""
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device))
                 for name, t in unet.state_dict(keep_vars=True).items())


def model_hash(model: DiffusionModel) -> str:
    """SHA-256 (hex) of the model's configs and weights; the weights hashed once per change."""
    unet = model.unet
    fingerprint = _fingerprint(unet)
    cached = _hashes.get(unet)
    if cached is None or cached[0] != fingerprint:
        h = hashlib.sha256()
        for name, t in unet.state_dict().items():
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        cached = (fingerprint, h.hexdigest())
        _hashes[unet] = cached
    configs = repr((model.config, model.schedule.config, model.sampling))
    return hashlib.sha256(f"{cached[1]}|{configs}".encode()).hexdigest()


class LRU:
    """At most `size` values by key, the least recently used dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T], valid: Callable[[T], bool]) -> T:
        """The value kept under `key` if `valid(value)`, else `build()` kept there."""
        if key in self._items:
            value = self._items.pop(key)
            if valid(value):
                self._items[key] = value  # now the most recent
                return value
        value = build()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def values(self) -> list:
        return list(self._items.values())

    def clear(self) -> None:
        self._items.clear()


# a few entries: each may hold a converted copy of the weights (a CIFAR-10 U-Net is 143 MB in fp32)
DENOISERS = LRU(4)
SAMPLERS = LRU(4)


def _still(model_key: str) -> Callable[[object], bool]:
    """An entry built from a model object is valid while that object still hashes to its key."""
    return lambda entry: model_hash(entry[0]) == model_key


def denoiser(model: DiffusionModel, backend: str, device: torch.device, dtype: torch.dtype,
             threads: int | None = None, quantize: str | None = None) -> Denoiser:
    """`backends.make_denoiser`, built once per (model content, backend, device, dtype, threads,
    quantization)."""
    threads = resolve_threads(threads)
    # the Backend itself, not only its name: one registered again under the same name is new
    key = (model_hash(model), get_backend(backend), str(device), dtype, threads, quantize)
    build = lambda: (model, make_denoiser(model, backend, device, dtype, threads, quantize))  # noqa: E731
    return DENOISERS.get(key, build, _still(key[0]))[1]


def cached(cache: LRU, model: DiffusionModel, key: Hashable, build: Callable[[], T]) -> T:
    """`build()` (an object over `model`) kept in `cache` under (model content, key)."""
    model_key = model_hash(model)
    return cache.get((model_key, key), lambda: (model, build()), _still(model_key))[1]


def clear() -> None:
    """Drop every kept engine and sampler (their memory goes with the last reference)."""
    DENOISERS.clear()
    SAMPLERS.clear()
