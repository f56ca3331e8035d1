"""torch-fidelity's InceptionV3 feature extractor (the standard FID / IS network, a port of the
TensorFlow graph the FID papers used), loaded so that nothing in a weights file can run code.

torch-fidelity's package `__init__` imports every metric and dataset it has, and with them
torchvision; a torchvision wheel that does not match the installed torch fails at import
('operator torchvision::nms does not exist' beside a CPU torch). The InceptionV3 module itself
needs only torch, so it is imported alone, under a bare package entry, without the `__init__`.

Its constructor reads a weights path with `torch.load(weights_only=False)`; a user's file is
therefore first read safely here (weights_only / safetensors: tensors only), and only a copy
this module wrote itself, holding nothing but those tensors, reaches the constructor.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from .digest import state_digest
from .errors import UserError
from .files import read_torch_file

# the pooled features FID may compare (torch-fidelity's feature_layer_fid, pytorch-fid's --dims):
# 2048 (pool3) is the standard; the smaller ones stop the network early
FEATURE_DIMS = (64, 192, 768, 2048)
FEATURE_DIM = 2048
LOGITS = "logits_unbiased"  # the 1008 class logits IS reads (torch-fidelity's choice)
NAME = "inception-v3-compat"
# torch-fidelity's weights file names its sha256 prefix; torch.hub checks a download against it
WEIGHTS_HASH_PREFIX = "6726825d"


def _module() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3, imported without the package __init__."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FID and IS need torch-fidelity: pip install --no-deps 'torch-fidelity>=0.4,<0.5' "
                        "(fastddpm uses its InceptionV3 alone, without torchvision)")
    if "torch_fidelity" not in sys.modules:  # a bare package: its submodules, not its __init__
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    return importlib.import_module(name)


def default_weights() -> Path:
    """torch-fidelity's own weights in torch.hub's cache, downloaded once where there is network."""
    url = _module().URL_INCEPTION_V3
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=WEIGHTS_HASH_PREFIX,
                                           progress=False)
        except OSError as e:  # no network (URLError is an OSError), or the cache is not writable
            raise UserError(f"cannot download torch-fidelity's InceptionV3 weights ({e}); pass "
                            f"a local copy of {path.name} with --inception-weights FILE") from None
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"Inception weights {path} not found; give the path of an InceptionV3 "
                        "state dict (torch-fidelity's weights-inception-2015-12-05 .pth)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    else:
        state = read_torch_file(path)
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise UserError(f"{path} is not a state dict (names → tensors); --inception-weights takes "
                        "torch-fidelity's InceptionV3 weights")
    return state


class Inception:
    """The network on `device` and the digest of its weights. `features(images)` takes
    (N, H, W, C) uint8 with C = 1 or 3 and returns float64 (N, dims) pooled features and, with
    `logits`, the (N, 1008) logits (else None), as torch-fidelity computes them (resized inside
    to 299²)."""

    def __init__(self, weights: str | Path | None, device: torch.device, dims: int = FEATURE_DIM,
                 logits: bool = False):
        if dims not in FEATURE_DIMS:
            raise UserError(f"Inception features come in {', '.join(map(str, FEATURE_DIMS))} "
                            f"dimensions, not {dims}")
        path = default_weights() if weights is None else Path(weights)
        state = _read_state(path)
        self.digest = state_digest(state)  # what cached statistics are keyed by
        self.device = device
        with tempfile.TemporaryDirectory(prefix="fastddpm-inception-") as tmp:
            copy = Path(tmp) / "state.pt"
            torch.save(state, copy)  # tensors only: safe for the constructor's torch.load
            try:
                net = _module().FeatureExtractorInceptionV3(
                    NAME, [str(dims), *([LOGITS] if logits else [])],
                    feature_extractor_weights_path=str(copy))
            except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped names
                raise UserError(f"{path} is not an InceptionV3 state dict of torch-fidelity's "
                                f"architecture ({str(e).splitlines()[0][:160]} ...)") from None
        self.net = net.to(device)
        self.dims = dims

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:  # grey → RGB, as torch-fidelity's image loader converts
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise UserError(f"images with {x.shape[1]} channels: FID and IS take grey or RGB")
        out = self.net(x.contiguous())
        return out[0].double(), out[1].double() if len(out) > 1 else None
