"""The host side of the step graph: the whole sampler is `for step: x, x0 = graph(x, step, z)`.

This is the Python twin of export/cpp/main.cpp, and the contract between them:

- noise file: raw little-endian float32, (S + 1, N, C, H, W) — x_T first, then the z of each of
  the S steps (the graph multiplies z by σ of the step; σ = 0 at the last step);
- x0_history, for multistep samplers (metadata `history` = K > 0: DPM-Solver++, UniPC), is a ring
  (K, N, C, H, W) that starts at zero; after step s the host writes the x0 output into slot
  s mod K (the graph reads x̂0 of step s − k from slot (s − k) mod K);
- with metadata `history_kind` "eps" (iPNDM) the ring is the input eps_history instead, and the
  host writes the graph's eps output into it the same way. Graphs exported before the key existed
  have an x̂0 ring.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from fastddpm.errors import UserError
from fastddpm.files import atomic_write

from .onnx import METADATA_KEY
from .onnx_graphs import HISTORY_IO


def step_graph_info(path: str | Path) -> dict:
    """The fastddpm metadata of a step graph (without loading its weights)."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(f"{METADATA_KEY}.graph") != "step":
        raise UserError(f"{path} is not a fastddpm step graph; export one with --what step")
    return json.loads(props[METADATA_KEY])


def noise_shape(info: dict, count: int) -> tuple[int, ...]:
    unet = info["unet"]
    return (info["sampler"]["num_steps"] + 1, count, unet["in_channels"], unet["image_size"],
            unet["image_size"])


def write_noise_file(path: str | Path, noise: torch.Tensor) -> None:
    with atomic_write(path) as tmp:
        noise.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tofile(tmp)


def read_noise_file(path: str | Path, shape: tuple[int, ...]) -> torch.Tensor:
    data = np.fromfile(path, dtype="<f4")
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} holds {data.size} floats; this graph and count need "
                        f"{int(np.prod(shape))} = {' x '.join(map(str, shape))}")
    return torch.from_numpy(data.reshape(shape))


def sample_with_step_graph(runner, noise: torch.Tensor, history: int,
                           history_kind: str = "x0") -> torch.Tensor:
    """x_0 (N, C, H, W) from x_T = noise[0] and step noise noise[1:], with a step-graph runner;
    `history`: the graph's ring slots (its metadata's sampler.history), of x̂0 or ε
    (`history_kind`, its sampler.history_kind)."""
    x = noise[0]
    ring = torch.zeros((history, *x.shape), dtype=x.dtype)
    ring_input, kept = HISTORY_IO[history_kind]
    for step in range(noise.shape[0] - 1):
        inputs = {"x": x, "step": torch.tensor([step]), "noise": noise[step + 1]}
        if history:
            inputs[ring_input] = ring
        out = runner(**inputs)
        x = out["x_prev"]
        if history:
            ring = ring.clone()  # a runner may hand back views of its own buffers
            ring[step % history] = out[kept]
    return x
