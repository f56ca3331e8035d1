"""Every sampling choice in one frozen object, with one set of defaults, parsed in one place.

`SamplingOptions` is what `fastddpm.sample()`, `Sampler`, the paper's uses, export's step graph,
`bench` and `eval` all take; `add_sampling_arguments(parser)` gives every command that samples
the same flags, and `SamplingOptions.from_args(args)` reads them back. An option the chosen
sampler does not use (η for DDPM, say) is refused in one line, never dropped.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace

import torch

from . import autoselect
from .backends import backend_names, get_backend
from .dtypes import QUANTIZATIONS, SAMPLING_DTYPES, cpu_has_native_bf16, torch_dtype
from .errors import UserError
from .samplers import SAMPLERS, SPACINGS

# the largest batch the runtime draws at once, and so the batch range of engines built for it
MAX_BATCH = 256

# The fast default: the fewest ε evaluations at the bundled model's DDPM-1000 quality
# (benchmarks/results/default_model/quality_vs_nfe.md). A sampler's steps when none are given:
# FAST_STEPS on a model that ships a tuned grid for it there (`fastddpm tune-steps`), SAFE_STEPS
# (FALLBACK_SPACING) on any other; DDPM's are the model's T, the paper's procedure.
DEFAULT_SAMPLER = "unipc"
FAST_STEPS = {"unipc": 4, "dpm++": 5}
SAFE_STEPS = 10
FALLBACK_SPACING = "trailing"


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample. None means "the model's own setting" (steps: its T; clip: its default)."""

    sampler: str = DEFAULT_SAMPLER  # a name in samplers.SAMPLERS
    steps: int | None = None  # ε evaluations; None: the sampler's default on the model (above)
    eta: float | None = None  # DDIM's η in [0, 1]; None: 0 (deterministic). DDIM only
    spacing: str | None = None  # the time grid; None: the model's tuned one, else FALLBACK_SPACING
    clip: bool | None = None  # clip x̂0 to [−1, 1]; None: the model's default
    device: str | None = None  # cpu | cuda[:N]; None: the GPU if there is one
    backend: str = "auto"  # the ε engine (fastddpm.backends); auto: the fastest here, measured
    dtype: str = "auto"  # the U-Net's; auto: see torch_dtype
    cuda_graph: bool = True  # capture the whole step as a CUDA graph (CUDA only)
    batch_size: int | None = None  # images per batch; None: min(num, MAX_BATCH)
    threads: int | None = None  # CPU threads of whichever engine runs; None: torch's count
    quantize: str | None = None  # int8: the ε-model's convolutions and matmuls in int8 (openvino)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise UserError(f"unknown timestep spacing {self.spacing!r}; choose one of "
                            f"{', '.join(SPACINGS)}")
        if self.steps is not None and self.steps <= 0:
            raise UserError(f"steps must be positive, got {self.steps}")
        if self.eta is not None:
            if "eta" not in SAMPLERS[self.sampler].options:
                raise UserError(f"η is a DDIM option; the {self.sampler} sampler takes none "
                                "(drop --eta, or use --sampler ddim)")
            if not (math.isfinite(self.eta) and 0.0 <= self.eta <= 1.0):
                raise UserError(f"eta must be in [0, 1], got {self.eta}")
        if self.backend not in backend_names():
            raise UserError(f"unknown backend {self.backend!r}; choose one of "
                            f"{', '.join(backend_names())}")
        if self.dtype not in SAMPLING_DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(SAMPLING_DTYPES)}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise UserError(f"batch size must be positive, got {self.batch_size}")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"threads must be positive, got {self.threads}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise UserError(f"unknown quantization {self.quantize!r}; choose one of "
                            f"{', '.join(QUANTIZATIONS)}")

    @classmethod
    def of(cls, options: SamplingOptions | None = None, **choices) -> SamplingOptions:
        """`options` (default: the defaults) with `choices` replaced: what every function that
        takes `options=` and keyword choices (`steps=20, sampler="ddim"`) resolves them to."""
        if options is not None and not isinstance(options, SamplingOptions):
            raise TypeError(f"options must be a SamplingOptions, got {options!r}; pass single "
                            "choices as keywords (sampler='ddim', steps=20)")
        options = cls() if options is None else options
        return options.replace(**choices) if choices else options

    def replace(self, **changes) -> SamplingOptions:
        """A copy with `changes` (checked like a new object; unknown names are a TypeError)."""
        return replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        """The options `add_sampling_arguments` put on `args` (those a command left out keep
        their defaults)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if hasattr(args, "no_cuda_graph"):
            given["cuda_graph"] = not args.no_cuda_graph
        return cls(**given)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The U-Net's dtype on `device`. `auto` is bf16 on a CPU with native bf16 (AVX512-BF16 or
        AMX) under a backend that runs faster in it (Backend.bf16_when_auto: openvino), or under
        `auto` where one of its installed candidates does (all are then timed in bf16) — on the
        digits judge bf16 holds fp32's quality in every case measured (README, "CPU engines") —
        and fp32 anywhere else, CUDA included; a named dtype is itself."""
        if self.dtype != "auto":
            return torch_dtype(self.dtype)
        if device.type != "cpu" or not cpu_has_native_bf16():
            return torch.float32
        engines = autoselect.installed_engines() if self.backend == "auto" else [self.backend]
        return torch.bfloat16 if any(get_backend(e).bf16_when_auto for e in engines) else torch.float32

    def batches(self, num: int) -> list[tuple[int, int]]:
        """(first sample index, batch size) for `num` samples."""
        size = min(num, self.batch_size or MAX_BATCH)
        return [(first, min(size, num - first)) for first in range(0, num, size)]


def add_sampling_arguments(p: argparse.ArgumentParser, execution: bool = True) -> None:
    """The flags of every command that samples; `execution=False` keeps only the sampler's own
    (what an exported step graph bakes in: no device, engine or batch)."""
    d = SamplingOptions()
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default=d.sampler, choices=list(SAMPLERS),
                   help="ddpm: the paper's ancestral sampler; ddim; dpm++, dpm++3m: DPM-Solver++(2M), "
                        "(3M); unipc, unipc3: UniPC of order 2, 3 (B(h) = e^h − 1; -bh1: B(h) = h); "
                        "ipndm, ipndm2, ipndm3: iPNDM (Adams-Bashforth on ε over DDIM) of order 4, "
                        "2, 3; multistep solvers run at lower order where fewer steps exist "
                        "(default: %(default)s). `--sampler ddpm --steps 1000` is the paper's "
                        "exact procedure")
    fast = ", ".join(f"{n} for {s}" for s, n in FAST_STEPS.items())
    g.add_argument("--steps", type=int, default=d.steps,
                   help=f"sampling steps = ε evaluations (default: {fast} on a model that ships a "
                        f"tuned grid for it, as the bundled one does; else {SAFE_STEPS}; the "
                        "model's T for ddpm)")
    g.add_argument("--eta", type=float, default=d.eta,
                   help="DDIM only: η in [0, 1] (default 0: deterministic)")
    g.add_argument("--spacing", default=d.spacing, choices=SPACINGS,
                   help="the time grid when steps < T; tuned: the model's own, made by "
                        "`fastddpm tune-steps` (default: tuned where the model has that grid, "
                        f"else {FALLBACK_SPACING})")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=d.clip,
                   help="clip the predicted x0 to [-r, r], r the model's clip range, 1 unless "
                        "it says otherwise (default: the model's setting)")
    if not execution:
        return
    g.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default: cuda if present)")
    g.add_argument("--backend", default=d.backend, choices=backend_names(),
                   help="the engine that computes ε; auto: torch on CUDA, on the CPU the fastest "
                        "installed one, timed on the first batch and remembered (default: %(default)s)")
    g.add_argument("--dtype", default=d.dtype, choices=SAMPLING_DTYPES,
                   help="U-Net dtype; auto: bf16 on a CPU with native bf16 (AVX512-BF16 or AMX) "
                        "for openvino, and for auto with openvino installed; fp32 otherwise; fp32 "
                        "for strict fp32; the step update's arithmetic is fp32 whatever this "
                        "(default: %(default)s)")
    g.add_argument("--no-cuda-graph", action="store_true", help="run the step loop eagerly on CUDA")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"images per batch (default: up to {MAX_BATCH})")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads of the ε engine, whichever runs (default: the threads torch "
                        "uses, usually one per core)")
    g.add_argument("--quantize", default=d.quantize, choices=QUANTIZATIONS,
                   help="int8: the ε-model quantized by NNCF, calibrated on its own samples once and "
                        "cached (openvino, CPU; the fastddpm[int8] extra); what stays in float runs "
                        "in --dtype (default: none)")
