"""A kernel launch as data: what a launcher runs now, and what `compile_report` compiles for a
GPU this machine does not have — one description, so the two cannot drift apart."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.library import wrap_triton


@dataclass(frozen=True)
class Launch:
    kernel: Callable  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments, in the kernel's order
    constexprs: dict[str, Any]  # the tl.constexpr arguments, by name
    num_warps: int

    def run(self) -> None:
        # wrap_triton: inside a triton_op, torch.compile and CUDA graphs see the kernel itself
        wrap_triton(self.kernel)[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
