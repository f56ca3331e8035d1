"""The kernels compiled for an H100 (sm_90) on this GPU-less machine, at the launches one sampling
step of the CIFAR-10 U-Net makes, specialised as Triton's JIT specialises them: every launch
compiles, none spills registers, and wherever a thread holds 16 bytes or more of the tile the
global loads and stores are 128-bit vectors — what streaming at copy bandwidth needs.

The compiler runs in a subprocess: this suite sets TRITON_INTERPRET=1 without a GPU, and under
the interpreter `triton.jit` makes functions that cannot be compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no NVIDIA backend")

ITEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@pytest.fixture(scope="module", params=["fp16", "bf16", "fp32"])
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastddpm.kernels.compile_report", "--arch", "90",
                          "--config", "cifar10", "--dtype", request.param, "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return request.param, json.loads(run.stdout)


def test_every_launch_of_a_step_compiles_for_sm90(compiled):
    _, rows = compiled
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_group_norm_registers_kernel", "_reverse_step_kernel"}, kernels
    # the distinct GroupNorms of the CIFAR-10 U-Net (51 calls) and one launch per sampler kind
    # (DDPM with clipping, with a learned variance too, DDIM, a ring of 1 and of 3 x̂0 slots)
    assert sum(row["kernel"] == "_reverse_step_kernel" for row in rows) == 5
    assert sum(row["kernel"] == "_group_norm_registers_kernel" for row in rows) >= 10


def test_no_launch_spills_registers(compiled):
    _, rows = compiled
    spilling = [(row["name"], row["spill_bytes"]) for row in rows if row["spill_bytes"]]
    assert not spilling, f"register spills on sm_90: {spilling}"
    assert all(0 < row["registers"] <= 255 for row in rows)


def test_wide_tiles_move_memory_in_128_bit_accesses(compiled):
    dtype, rows = compiled
    wide = [row for row in rows if row["elements_per_thread"] * ITEM_BYTES[dtype] >= 16]
    assert len(wide) >= 8  # the 32² and 16² levels and the reverse steps
    narrow = [(row["name"], row["load_bits"], row["store_bits"]) for row in wide
              if row["load_bits"] != 128 or row["store_bits"] != 128]
    assert not narrow, f"scalar or 64-bit accesses where a thread holds ≥ 16 bytes: {narrow}"


def test_the_unet_makes_51_group_norm_calls_per_forward():
    """The count the kernels issue works from (51 GroupNorms in the CIFAR-10 U-Net), traced on the
    meta device; every one normalises 32 groups."""
    from fastddpm.kernels.compile_report import unet_group_norm_calls
    from fastddpm.unet import CONFIGS

    calls = unet_group_norm_calls(CONFIGS["cifar10"])
    assert len(calls) == 51
    assert {groups for _, groups, _, _ in calls} == {32}
    # each ResBlock's second norm takes the time embedding as bias_nc: one per ResBlock
    assert sum(with_bias for _, _, with_bias, _ in calls) == 22
    assert all(shape[0] == 1 and len(shape) == 4 for shape, *_ in calls)
