"""`backend="auto"`: the fastest installed ε engine, picked by measurement and kept.

On CUDA it is the torch backend (captured with the whole step as a CUDA graph). On the CPU, the
first batch of each size times every installed engine (torch, onnxruntime, openvino; compile is
left out: compiling costs minutes) on that batch, one call at a time so no two thread pools run
together, for about a second in all after one warm-up call each, and keeps the fastest for that
(model, batch size, dtype, threads). The engines take turns, one call each a round, and each
one's median call counts, so a burst of load from elsewhere on a shared machine slows every
engine alike rather than the one being timed (timed one after another, such bursts picked
engines 40-75 % slower per step than the best: benchmarks/results/cpu-20261204). All
candidates are alive while they take turns; the losers go with the pick. The pick is kept in
this denoiser (which sessions keeps for the process) and in the disk cache, so a fresh process
builds only the winner. An engine that cannot run the dtype here is skipped. What was picked
and why goes to the `fastddpm` logger (`--verbose`). With `quantize`, the candidates are the
engines that run that quantization.
$FASTDDPM_AUTO_ENGINES (comma-separated) narrows the candidates (the test suite: torch only).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from . import disk_cache
from .backends import (
    Backend,
    Denoiser,
    backend_names,
    get_backend,
    make_denoiser,
    resolve_device,
    resolve_threads,
)
from .dtypes import QUANTIZATIONS, dtype_name
from .errors import UserError
from .sessions import model_hash

log = logging.getLogger("fastddpm")

# engine → the modules it needs (checked without importing them)
CPU_ENGINES = {"torch": (), "onnxruntime": ("onnxruntime", "onnx", "onnxscript"),
               "openvino": ("openvino",)}
BUDGET_S = 1.0  # timed calls of all engines together, after their warm-up calls


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # set to None in sys.modules: blocked on purpose
        return False


def installed_engines() -> list[str]:
    """The candidates: installed, and named in $FASTDDPM_AUTO_ENGINES where that is set."""
    known = backend_names()
    wanted = os.environ.get("FASTDDPM_AUTO_ENGINES")
    allowed = CPU_ENGINES if not wanted else [w.strip() for w in wanted.split(",")]
    return [name for name, modules in CPU_ENGINES.items() if name in known and name in allowed
            and all(_importable(m) for m in modules)]


def _versions(engines: list[str]) -> dict[str, str]:
    from importlib.metadata import version

    return {"torch": torch.__version__, **{m: version(m) for e in engines for m in CPU_ENGINES[e]}}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def time_engines(engines: dict[str, Denoiser], x: torch.Tensor, t: torch.Tensor,
                 budget_s: float) -> dict[str, float]:
    """Median seconds of one ε call of each engine: one warm-up call each, then rounds of one
    call each, in turn, until `budget_s` is spent (at least one round)."""
    for denoise in engines.values():
        denoise(x, t)
    times: dict[str, list[float]] = {name: [] for name in engines}
    spent = 0.0
    while spent == 0.0 or spent < budget_s:
        for name, denoise in engines.items():
            start = time.perf_counter()
            denoise(x, t)
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
    return {name: statistics.median(calls) for name, calls in times.items()}


class AutoDenoiser:
    """`denoise(x, t)` that runs, for each batch size, the engine it picked for that size."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, threads: int,
                 quantize: str | None = None):
        self.model, self.device, self.dtype, self.threads = model, device, dtype, threads
        self.quantize = quantize
        self.engines: dict[int, Denoiser] = {}
        self.choices: dict[int, dict] = {}  # batch → {"engine", "ms" per engine, "why"}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if batch not in self.engines:
            self.engines[batch] = self._choose(x, t)
        return self.engines[batch](x, t)

    def _key(self, batch: int, engines: list[str]) -> dict:
        return {"model": model_hash(self.model), "batch": batch, "dtype": dtype_name(self.dtype),
                "quantize": self.quantize, "threads": self.threads, "cpu": _cpu_name(),
                "versions": _versions(engines)}

    def _choose(self, x: torch.Tensor, t: torch.Tensor) -> Denoiser:
        batch = x.shape[0]
        engines = installed_engines()
        if not engines:
            raise UserError("FASTDDPM_AUTO_ENGINES names no installed engine; unset it or name some "
                            f"of {', '.join(CPU_ENGINES)}")
        if self.quantize is not None:
            engines = [e for e in engines if self.quantize in get_backend(e).quantizations]
            if not engines:
                raise UserError(f"no installed engine runs --quantize {self.quantize}; "
                                "pip install 'fastddpm[int8]', or drop --quantize")
        key = self._key(batch, engines)
        folder = disk_cache.load("auto", key)  # its files are intact (their hashes checked)
        if folder is not None:
            choice = json.loads((folder / "choice.json").read_text())
            choice["why"] = "measured before (disk cache)"
            return self._keep(batch, choice, self._build(choice["engine"]))
        if len(engines) == 1:  # nothing to choose between: no timing
            choice = {"engine": engines[0], "why": "the only candidate"}
            return self._keep(batch, choice, self._build(engines[0]))
        built, refused = {}, {}
        for name in engines:
            try:
                built[name] = self._build(name)
            except UserError as e:  # this engine cannot run this dtype on this machine
                refused[name] = str(e)
        if not built:
            raise UserError(f"no installed engine runs {dtype_name(self.dtype)} on this CPU; "
                            "use --dtype fp32")
        times = time_engines(built, x, t, BUDGET_S)
        best = min(times, key=times.get)
        choice = {"engine": best, "ms": {n: round(1e3 * s, 2) for n, s in times.items()},
                  "refused": refused}
        disk_cache.store("auto", key, lambda d: (d / "choice.json").write_text(json.dumps(choice)))
        choice["why"] = "fastest measured"
        return self._keep(batch, choice, built[best])

    def _build(self, name: str) -> Denoiser:
        return make_denoiser(self.model, name, self.device, self.dtype, self.threads, self.quantize)

    def _keep(self, batch: int, choice: dict, denoise: Denoiser) -> Denoiser:
        self.choices[batch] = choice
        timings = ", ".join(f"{n} {ms:.1f}" for n, ms in choice.get("ms", {}).items())
        skipped = "; ".join(f"{n} skipped: {why}" for n, why in choice.get("refused", {}).items())
        precision = dtype_name(self.dtype) + (f", {self.quantize}" if self.quantize else "")
        log.info("auto: %s for batch %d in %s on %d threads (%s%s%s)", choice["engine"], batch,
                 precision, self.threads, choice["why"],
                 f"; ε ms: {timings}" if timings else "", f"; {skipped}" if skipped else "")
        return denoise


def engine_for(model, options, batch: int) -> str:
    """The engine `auto` runs `model`'s batches of `batch` images with, here and as `options`
    (a SamplingOptions) say: torch on CUDA, else the CPU engine measured fastest (or remembered
    by the disk cache). What a torchrun job's rank 0 decides for every rank, so that all run one
    engine and give the bytes of one process."""
    device = resolve_device(options.device)
    if device.type == "cuda":
        return "torch"
    auto = AutoDenoiser(model, device, options.torch_dtype(device), resolve_threads(options.threads),
                        options.quantize)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size).to(auto.dtype)
    t = model.table(options).timesteps[:1].expand(batch)
    auto._choose(x, t)
    return auto.choices[batch]["engine"]


@contextlib.contextmanager
def explained(backend: str) -> Iterator[None]:
    """`--verbose` for the length of one command: the `fastddpm` logger's lines go to stderr;
    auto says what it picks and why as it picks, any other backend is named now. Undone when the
    command ends, so a caller that runs commands in one process (cli.main, the tests) gets no
    stray lines from a later command, nor writes to a stderr that has since been replaced."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        if backend != "auto":
            log.info("engine: %s (asked for with --backend)", backend)
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def make(model, device: torch.device, dtype: torch.dtype, threads: int | None = None,
         quantize: str | None = None) -> Callable:
    device = torch.device(device)
    if device.type == "cuda":  # the CUDA-graph path: torch, captured with the step
        if quantize is not None:
            raise UserError(f"--quantize {quantize} runs on the CPU; add --device cpu, or drop --quantize")
        log.info("auto: torch on %s (the CUDA-graph path)", device)
        return make_denoiser(model, "torch", device, dtype, threads)
    return AutoDenoiser(model, device, dtype, resolve_threads(threads), quantize)


# graph_capturable: on CUDA it is the torch backend's ε; quantizations: its CPU candidates'
AUTO = Backend("auto", make, graph_capturable=True, quantizations=QUANTIZATIONS)
