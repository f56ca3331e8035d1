"""`fastddpm export MODEL --format onnx|tensorrt`: deployment artifacts of a model."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastddpm.dtypes import DTYPES
from fastddpm.errors import UserError
from fastddpm.files import refuse_overwriting_inputs
from fastddpm.limits import check_request_fits
from fastddpm.options import MAX_BATCH, SamplingOptions, add_sampling_arguments

from . import GRAPHS, require_onnx_export

FORMATS = ("onnx", "tensorrt")
DEFAULT_MAX_BATCH = MAX_BATCH  # a dynamic engine takes every batch the runtime draws


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"batch must be positive, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file (.pt / .safetensors), or 'default' for the bundled model")
    p.add_argument("--format", default="onnx", choices=FORMATS)
    p.add_argument("-o", "--out", default=None,
                   help="output file (default: <model>.<graph>.onnx / <model>.<graph>.plan); "
                        "with --what both, .eps and .step are inserted before the extension")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="weights and I/O dtype of the graph (GroupNorm statistics stay fp32)")
    p.add_argument("--batch", type=_batch, default=None, metavar="N|dynamic",
                   help="fixed batch size, or 'dynamic' (default)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="TensorRT: largest batch of a dynamic engine's profile "
                        f"(default {DEFAULT_MAX_BATCH})")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 21, 22 for bf16; below 21 GroupNorm is decomposed)")
    p.add_argument("--what", default="eps", choices=GRAPHS,
                   help="eps: the ε-model; step: one sampler step with the ε-model inside; both")
    add_sampling_arguments(p, execution=False)  # the step graph's sampler


def default_out(model: str, what: str, fmt: str) -> Path:
    stem = Path(model).stem if model != "default" else "default"
    graph = "" if what == "both" else f".{what}"
    return Path(f"{stem}{graph}.{'plan' if fmt == 'tensorrt' else 'onnx'}")


def run(args: argparse.Namespace) -> int:
    from fastddpm import checkpoint

    require_onnx_export("export")
    from .onnx import OnnxOptions

    if args.format == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()  # before loading anything: the fix is an install, say so at once
    if args.max_batch <= 0:
        raise UserError(f"--max-batch must be positive, got {args.max_batch}")
    options = OnnxOptions(dtype=args.dtype, batch=args.batch, opset=args.opset, what=args.what,
                          sampling=SamplingOptions.from_args(args))
    out = Path(args.out) if args.out else default_out(args.model, args.what, args.format)
    from .onnx import output_paths

    for path in output_paths(out, args.what).values():  # with their .data sidecars
        refuse_overwriting_inputs(path, args.model)
        refuse_overwriting_inputs(f"{path}.data", args.model)
    model = checkpoint.load(args.model)
    if args.batch is not None:  # traced, and validated against PyTorch, at that batch
        check_request_fits(model.config, 0, args.batch, f"--batch {args.batch}")
    if args.format == "onnx":
        from .onnx import export_onnx

        export_onnx(model, out, options)
    else:
        from .tensorrt import export_tensorrt

        export_tensorrt(model, out, options, max_batch=args.max_batch)
    return 0
