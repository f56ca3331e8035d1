"""Every kernel launch the runtime makes, compiled for an NVIDIA GPU on a machine without one.

Triton compiles ahead of time for a named target with the ptxas it ships. Each launch's arguments
are specialised as Triton's JIT specialises them at a real launch (its own rule: pointers and
integers divisible by 16 get an alignment hint, integers equal to 1 become constants), so the
code compiled here is the code a launch on that GPU runs. Without a GPU this shows that every
launch compiles for the target, its registers, stack and spills per thread, and the widest
global load and store in its PTX: 128-bit accesses are what lets a kernel stream at copy
bandwidth. It measures no time; the bandwidth figures come from benchmarks/bench_kernels.py on
a GPU.

    python -m fastddpm.kernels.compile_report [--arch 90] [--config cifar10] [--dtype fp16]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from fastddpm import kernels
from fastddpm.dtypes import DTYPES
from fastddpm.samplers import COEF_FIELDS
from fastddpm.unet import CONFIGS, UNet, UNetConfig

try:
    import triton
    from triton._C.libtriton import native_specialize_impl  # the JIT's own specialisation rule
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend

    from .group_norm_silu import group_norm_silu_launch, group_norm_silu_reference
    from .launch import Launch
    from .reverse_step import new_history, reverse_step_launch
except ImportError as missing:
    if __name__ == "__main__":
        sys.exit(f"compile_report needs Triton with its NVIDIA backend ({missing.name} is missing); "
                 "pip install 'fastddpm[kernels]'")
    raise

@dataclass(frozen=True)
class CompiledLaunch:
    name: str  # what the runtime launches it for
    kernel: str
    num_warps: int
    elements_per_thread: int  # of the tile a program holds at once (its BLOCK* constexprs)
    registers: int  # per thread
    spill_bytes: int  # spill stores per thread
    stack_bytes: int
    shared_bytes: int
    load_bits: int  # the widest global load in the PTX
    store_bits: int  # the widest global store


def _access_bits(ptx: str, op: str) -> int:
    """The widest `ld.global` / `st.global` of the PTX in bits (vector length × element bits)."""
    widest = 0
    for vector, bits in re.findall(rf"\b{op}\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        widest = max(widest, int(vector or 1) * int(bits))
    return widest


def _ptxas_info(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill stores and stack frame per thread, from `ptxas -v` on the PTX."""
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                              str(source), "-o", str(Path(work) / "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "stack_bytes": int(re.search(r"(\d+) bytes stack frame", log).group(1))}


def compile_launch(name: str, launch: Launch, arch: int) -> CompiledLaunch:
    """Compile `launch` for sm_<arch> as the JIT would at that launch, and read back its resources."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constants, attrs = {}, {}, {}
    runtime_args = iter(launch.args)
    for index, param in enumerate(launch.kernel.params):
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", launch.constexprs[param.name]
            continue
        kind, spec = native_specialize_impl(backend, next(runtime_args), param.is_const,
                                            not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constants[param.name] = spec
        elif isinstance(spec, str) and backend.parse_attr(spec):
            attrs[(index,)] = backend.parse_attr(spec)
    options = backend.parse_options({"num_warps": launch.num_warps}).__dict__
    compiled = triton.compile(ASTSource(launch.kernel, signature, constants, attrs), target=target,
                              options=options)
    ptx = compiled.asm["ptx"]
    tile = math.prod(v for k, v in launch.constexprs.items() if k.startswith("BLOCK"))
    per_thread = max(1, tile // (launch.num_warps * 32))
    return CompiledLaunch(name, launch.kernel.__name__, launch.num_warps, per_thread,
                          **_ptxas_info(ptx, arch),
                          shared_bytes=compiled.metadata.shared,
                          load_bits=_access_bits(ptx, "ld"), store_bits=_access_bits(ptx, "st"))


def unet_group_norm_calls(config: UNetConfig) -> list[tuple[tuple[int, ...], int, bool, bool]]:
    """Every `group_norm_silu` call of one U-Net forward, in order, as (x shape at batch 1,
    groups, with bias_nc, with SiLU): the forward runs on the meta device (no memory, no
    arithmetic) with the op replaced by a recorder that hands on to the reference."""
    calls = []

    def record(x, weight, bias, groups, eps, bias_nc=None, silu=True, mode="auto", scale_shift=None):
        calls.append((tuple(x.shape), groups, bias_nc is not None, silu))
        return group_norm_silu_reference(x, weight, bias, groups, eps, bias_nc, silu, scale_shift)

    with torch.device("meta"), mock.patch.object(kernels, "group_norm_silu", record):
        unet = UNet(config)
        size = config.image_size
        unet(torch.empty(1, config.in_channels, size, size), torch.zeros(1, dtype=torch.int64))
    return calls


def runtime_launches(config: UNetConfig, dtype: torch.dtype) -> list[tuple[str, Launch]]:
    """What one sampling step launches for `config` in `dtype` (NCHW, as the sampler's buffers):
    each distinct GroupNorm of the U-Net, and the reverse step of each sampler."""
    launches = []
    for shape, groups, with_bias_nc, silu in dict.fromkeys(unet_group_norm_calls(config)):
        x = torch.empty(shape, dtype=dtype)
        weight, bias = torch.empty(shape[1], dtype=dtype), torch.empty(shape[1], dtype=dtype)
        bias_nc = torch.empty(shape[:2], dtype=dtype) if with_bias_nc else None
        name = (f"group_norm C={shape[1]} G={groups} {'×'.join(map(str, shape[2:]))}"
                f"{' +bias_nc' if with_bias_nc else ''}{' +silu' if silu else ''}")
        launches.append((name, group_norm_silu_launch(x, weight, bias, groups, 1e-6, bias_nc, silu,
                                                      torch.empty_like(x))))
    x = torch.empty(1, config.in_channels, config.image_size, config.image_size, dtype=dtype)
    coef = torch.empty(8, len(COEF_FIELDS))
    step, rng = torch.empty(1, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for name, slots, clip, learned in [("reverse_step ddpm (clip)", 0, True, False),
                                       ("reverse_step ddpm, learned variance (clip)", 0, True, True),
                                       ("reverse_step ddim", 0, False, False),
                                       ("reverse_step dpm++ (x̂0 ring of 1)", 1, False, False),
                                       ("reverse_step unipc3 (x̂0 ring of 3)", 3, False, False)]:
        ring = new_history(x, slots) if slots else None
        x0_out = None if slots else torch.empty_like(x)  # the runtime's: x̂0 in the ring or nowhere
        variance = torch.empty_like(x) if learned else None
        launches.append((name, reverse_step_launch(x, torch.empty_like(x), coef, step, rng, ring,
                                                   torch.empty_like(x), x0_out, clip, variance)))
    return launches


def markdown(rows: list[CompiledLaunch]) -> str:
    lines = ["| launch | kernel | warps | elements / thread | registers | spill stores (B) | stack (B) "
             "| shared (B) | widest load / store (bits) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.kernel.lstrip('_')} | {r.num_warps} | {r.elements_per_thread} "
              f"| {r.registers} | {r.spill_bytes} | {r.stack_bytes} | {r.shared_bytes} "
              f"| {r.load_bits} / {r.store_bits} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastddpm.kernels.compile_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # @triton.jit then makes interpreter functions
        sys.exit("compile_report: unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = [compile_launch(name, launch, args.arch)
            for name, launch in runtime_launches(CONFIGS[args.config], DTYPES[args.dtype])]
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=1))
        return
    print(f"{args.config} U-Net, {args.dtype}, batch 1, compiled for "
          f"{sm_arch_from_capability(args.arch)} with Triton {triton.__version__}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
