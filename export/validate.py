"""Validation of an exported graph: run it on fresh random inputs and compare with PyTorch.

The reference is always the fp32 model on the CPU, fed the very values the graph got (so an fp16
graph's error is its own rounding, not the inputs'). The error is max |graph − torch| over
max(1, max |torch|): absolute for outputs of unit size, relative for larger ones. In the step
graph an ε error reaches x̂0 multiplied by c_e = √(1/ᾱ_t − 1) (up to ~150 at t = T for the linear
schedule), so there the tolerance is scaled by 1 + c_e of the row being checked.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastddpm.dtypes import DTYPES
from fastddpm.errors import UserError
from fastddpm.samplers import COEF_FIELDS, SamplerTable
from fastddpm.unet import UNet

from .onnx_graphs import TRACE_BATCH, StepGraph, example_inputs, step_outputs
from .runners import OrtRunner, import_onnxruntime

# max error (as above) an export may show against PyTorch fp32, per graph dtype: fp32 leaves
# only summation order; fp16 / bf16 carry 11 / 8 significant bits through ~30 layers
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1.5e-1}
VALIDATION_SEED = 20200619  # fresh random inputs, but the same ones on every run


def graph_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max(1, max |want|))."""
    abs_err = float((got.float() - want.float()).abs().max())
    return abs_err, abs_err / max(1.0, float(want.abs().max()))


def _batch(fixed: int | None) -> int:
    return fixed if fixed is not None else TRACE_BATCH + 1  # dynamic: not the traced batch


def compare(run, unet: UNet, graph: str, dtype: str, batch: int | None,
            table: SamplerTable | None = None) -> tuple[float, float, float]:
    """Runs `run(**inputs) -> {name: tensor}` against torch; returns the worst
    (max abs error, error, tolerance) — error as in the module docstring."""
    cfg = unet.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    tol = TOLERANCES[dtype]
    if graph == "eps":
        inputs = example_inputs("eps", shape, _batch(batch), DTYPES[dtype], generator=gen)
        got = run(**inputs)["eps"]
        with torch.no_grad():
            want = unet(inputs["x"].float(), inputs["t"])
        return (*graph_error(got, want), tol)
    reference = StepGraph(unet, table).eval()
    worst = (0.0, 0.0, tol)
    c_e = table.coef[:, COEF_FIELDS.index("c_e")] * table.x0_scale  # ε's weight in the x0 output
    for step in sorted({0, table.num_steps // 2, table.num_steps - 1}):  # noisiest, middle, last
        inputs = example_inputs("step", shape, _batch(batch), DTYPES[dtype], table.num_steps,
                                table.history, generator=gen, history_kind=table.history_kind)
        inputs["step"] = torch.tensor([step])
        got = run(**inputs)
        with torch.no_grad():
            want = reference(**{k: (v.float() if v.is_floating_point() else v)
                                for k, v in inputs.items()})
        step_tol = tol * (1.0 + float(c_e[step]))
        for name, w in zip(step_outputs(table), want, strict=True):
            abs_err, err = graph_error(got[name], w)
            if not err / step_tol <= worst[1] / worst[2]:  # NaN counts as worst
                worst = (abs_err, err, step_tol)
    return worst


def validation_device(dtype: str) -> torch.device:
    """Where ONNX Runtime validates: CUDA when both torch and ORT have it, else the CPU — which
    has no bfloat16 kernels (Gemm, Conv), so a bf16 export is refused there before the trace."""
    ort = import_onnxruntime()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return torch.device("cuda")
    if dtype == "bf16":
        raise UserError("ONNX Runtime's CPUExecutionProvider has no bf16 kernels (Gemm, Conv), so a "
                        "bf16 export cannot be validated here; export bf16 on a GPU machine with "
                        "onnxruntime-gpu, or use --dtype fp16 / fp32")
    return torch.device("cpu")


def validate(path: Path, unet: UNet, graph: str, dtype: str, batch: int | None,
             table: SamplerTable | None = None) -> str:
    """Run the ONNX file at `path` with ONNX Runtime (CUDA EP if usable, else CPU) against the
    fp32 `unet`; UserError above tolerance, else a one-line report."""
    device = validation_device(dtype)
    runner = OrtRunner(path, device)

    def run(**inputs):
        return {k: v.cpu() for k, v in runner(**{k: v.to(device) for k, v in inputs.items()}).items()}

    abs_err, err, tol = compare(run, unet, graph, dtype, batch, table)
    verdict = (f"max abs error {abs_err:.2e} against PyTorch fp32 on ONNX Runtime "
               f"{runner.provider} (scaled {err:.2e}, tolerance {tol:.1e} for {dtype})")
    if not err <= tol:  # also catches NaN
        raise UserError(f"{path.name} does not match PyTorch: {verdict}; nothing was written")
    return "validated, " + verdict
