"""Test helper: the two sampling chains the interop tests compare, in float64 from one x_T with
one noise — ours (a loaded model's table, its network's output split into prediction and
learned variance as the runtime splits it, the reverse-step reference and history ring) and diffusers' own
scheduler loop (its randn_tensor handed our noise by the caller)."""
import copy

import torch

from fastddpm.kernels import reverse_step_reference
from fastddpm.kernels.noise import INIT_STREAM, STEP_STREAM, gaussian
from fastddpm.model import DiffusionModel
from fastddpm.samplers import SamplerTable
from fastddpm.variance import split_output


def chain_noise(seed: int, batch: int, steps: int, shape: tuple[int, ...]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x_T and the z of each step, float64, as the runtime draws them."""
    index = torch.arange(batch)
    return (gaussian(seed, index, 0, shape, INIT_STREAM).double(),
            [gaussian(seed, index, i, shape, STEP_STREAM).double() for i in range(steps)])


def our_chain(model: DiffusionModel, table: SamplerTable, x_T: torch.Tensor,
              noise: list[torch.Tensor], x0s: list | None = None) -> torch.Tensor:
    """`table`'s chain from x_T, with its history ring (the x̂0's, or raw ε's, of the last
    `table.history` steps, newest first) kept as the runtime keeps it; each step's x̂0 as the
    kernel returns it (x̂0/table.x0_scale) appended to `x0s` if given."""
    net = copy.deepcopy(model.unet).double()
    x, history, eps_history = x_T, [], table.history_kind == "eps"
    with torch.no_grad():
        for i, t in enumerate(table.timesteps.tolist()):
            prediction, w = split_output(net(x, torch.full((x.shape[0],), t)), x.shape[1],
                                         table.learned_variance)
            x, x0 = reverse_step_reference(x, prediction, table.coef[i], noise[i], history,
                                           clip=table.clip, variance=w, eps_history=eps_history)
            history = [prediction if eps_history else x0, *history][:table.history]
            if x0s is not None:
                x0s.append(x0)
    return x


def their_chain(scheduler, unet, x_T: torch.Tensor, **step_options) -> torch.Tensor:
    """`scheduler` (timesteps set, float64 tables) stepping `unet` (a UNet2DModel) from x_T."""
    net = unet.double()
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t).sample, t, x, **step_options).prev_sample
    return x
