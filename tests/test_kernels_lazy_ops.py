"""The fused ops are registered where they can run and when they are asked for: a CPU-only process
that imports the kernels (every `fastddpm` command) neither registers them nor imports
torch._inductor (a second of a cold start); a call in mode "op" registers its op, and then
torch.compile traces through it with the graph whole."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import torch
from kernel_checks import needs_triton

from fastddpm import kernels

PROBE = """
import importlib, json, sys
import torch
import fastddpm.kernels
lazy = [importlib.import_module("fastddpm.kernels.group_norm_silu").GROUP_NORM_SILU_OP,
        importlib.import_module("fastddpm.kernels.reverse_step").REVERSE_STEP_OP]
print(json.dumps({"inductor": "torch._inductor" in sys.modules,
                  "registered": [op.registered for op in lazy],
                  "ops": [hasattr(torch.ops.fastddpm, op.name) for op in lazy]}))
"""


@needs_triton
def test_importing_the_kernels_registers_nothing_without_a_gpu():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    state = json.loads(run.stdout.strip().splitlines()[-1])
    if torch.cuda.is_available():  # registered at once, for code torch.compile traces
        assert state["registered"] == [True, True] and state["ops"] == [True, True]
    else:
        assert state == {"inductor": False, "registered": [False, False], "ops": [False, False]}


def _norm_inputs():
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(2, 8, 4, 4, generator=gen), torch.randn(8, generator=gen),
            torch.randn(8, generator=gen), torch.randn(2, 8, generator=gen))


@needs_triton
def test_a_call_in_op_mode_registers_the_op_and_compiles_whole():
    x, weight, bias, bias_nc = _norm_inputs()

    def fused(x):
        return kernels.group_norm_silu(x, weight, bias, 4, 1e-6, bias_nc, mode="op") * 2

    want = kernels.group_norm_silu(x, weight, bias, 4, 1e-6, bias_nc, mode="reference") * 2
    torch.testing.assert_close(fused(x), want)
    assert importlib.import_module("fastddpm.kernels.group_norm_silu").GROUP_NORM_SILU_OP.registered
    assert hasattr(torch.ops.fastddpm, "group_norm_silu")
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fused, fullgraph=True)(x), want)


@needs_triton
def test_the_reverse_step_op_registers_on_first_use():
    gen = torch.Generator().manual_seed(5)
    x, eps = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    coef = torch.rand(1, 8, generator=gen)  # one row: c_x, c_e, a, b, c, d_1, s, σ_row
    step, rng = torch.zeros(1, dtype=torch.int64), torch.tensor([7, 0])
    want, _ = kernels.reverse_step(x, eps, coef, step, rng, mode="reference")
    got, _ = kernels.reverse_step(x, eps, coef, step, rng, mode="op")
    torch.testing.assert_close(got, want)
    assert importlib.import_module("fastddpm.kernels.reverse_step").REVERSE_STEP_OP.registered
    assert hasattr(torch.ops.fastddpm, "reverse_step")

