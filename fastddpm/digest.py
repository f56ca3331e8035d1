"""Content hashes of weights: what a sharded run's manifest and cached FID statistics are keyed
by, so that the same numbers give the same key whatever file or folder they were read from."""
from __future__ import annotations

import hashlib

import torch


def state_digest(state: dict[str, torch.Tensor], prefix: bytes = b"") -> str:
    """sha256 (hex) of `prefix` and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(prefix)
    for name, value in sorted(state.items()):
        t = value.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor has no byte view
        h.update(f"{name}:{t.dtype}:{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
