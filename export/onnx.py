"""`fastddpm export --format onnx`: the ε graph and/or the step graph, validated, written atomically.

Each artifact is traced (onnx_graphs), tagged with JSON metadata (model config, schedule,
sampler), saved into a temp folder beside its destination (with a `.data` sidecar when the
weights pass the 2 GB protobuf limit), checked with `onnx.checker`, run with ONNX Runtime against
PyTorch (validate), and only then renamed into place: a failure leaves nothing behind.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from fastddpm.dtypes import DTYPES, torch_dtype
from fastddpm.errors import UserError
from fastddpm.files import check_writable_target
from fastddpm.model import DiffusionModel
from fastddpm.options import SamplingOptions

from . import GRAPHS
from . import onnx_graphs as graphs
from .validate import validate, validation_device

METADATA_KEY = "fastddpm"
# protobuf refuses messages over 2 GiB; keep headroom for the graph itself
EXTERNAL_DATA_BYTES = 2**31 - 2**26


@dataclass(frozen=True)
class OnnxOptions:
    dtype: str = "fp32"  # fp32 | fp16 | bf16: the graph's I/O and weight dtype
    batch: int | None = None  # None: dynamic batch
    opset: int | None = None  # None: 21 (22 for bf16)
    what: str = "eps"  # eps | step | both
    sampling: SamplingOptions = SamplingOptions()  # the step graph's sampler (its table part)
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # weights above this go to a .data sidecar


def resolve_opset(options: OnnxOptions) -> int:
    """The opset to write, or a one-line error when it cannot carry the options."""
    torch_dtype(options.dtype)  # a one-line error for an unknown name
    newest = onnx.defs.onnx_opset_version()
    if options.opset is None:
        return graphs.BF16_MIN_OPSET if options.dtype == "bf16" else graphs.GROUPNORM_NATIVE_OPSET
    if options.opset < graphs.MIN_OPSET:
        raise UserError(f"opset {options.opset} is too old: the exporter writes opset "
                        f"{graphs.MIN_OPSET} and newer (GroupNorm is decomposed below "
                        f"{graphs.GROUPNORM_NATIVE_OPSET}); pass --opset {graphs.MIN_OPSET} or newer")
    if options.opset > newest:
        raise UserError(f"opset {options.opset} is newer than this onnx package knows ({newest}); "
                        f"pass --opset {newest} or older, or upgrade onnx")
    if options.dtype == "bf16" and options.opset < graphs.BF16_MIN_OPSET:
        raise UserError(f"bf16 needs opset {graphs.BF16_MIN_OPSET} or newer (Conv and Gemm take "
                        f"bfloat16 from there); pass --opset {graphs.BF16_MIN_OPSET}")
    return options.opset


def output_paths(out: str | os.PathLike, what: str) -> dict[str, Path]:
    """graph → path: `out` itself for one graph; `<stem>.eps<ext>` and `<stem>.step<ext>` for both."""
    if what not in GRAPHS:
        raise UserError(f"unknown graph {what!r}; choose one of {', '.join(GRAPHS)}")
    out = Path(out)
    if what != "both":
        return {what: out}
    return {g: out.with_name(f"{out.stem}.{g}{out.suffix or '.onnx'}") for g in ("eps", "step")}


def metadata(model: DiffusionModel, graph: str, options: OnnxOptions, opset: int,
             table=None) -> dict[str, str]:
    """What a host needs to drive the graph, as ONNX metadata_props (JSON + flat keys for C++)."""
    info = {"graph": graph, "dtype": options.dtype, "batch": options.batch or "dynamic",
            "opset": opset, "unet": model.config.to_dict(),
            "schedule": model.schedule.config.to_dict(), "sampling": model.sampling.to_dict()}
    props = {}
    if table is not None:
        sampling = options.sampling
        steps, grid = model.plan(sampling)  # what the defaults resolve to on this model
        spacing = sampling.spacing or (grid if isinstance(grid, str) else "tuned")
        info["sampler"] = {"name": table.name, "steps": steps, "eta": sampling.eta,
                           "spacing": spacing, "clip": table.clip,
                           "num_steps": table.num_steps, "history": table.history,
                           "history_kind": table.history_kind, "timesteps": table.timesteps.tolist()}
        props = {f"{METADATA_KEY}.num_steps": str(table.num_steps),
                 f"{METADATA_KEY}.history": str(table.history),
                 f"{METADATA_KEY}.history_kind": table.history_kind}
    return {METADATA_KEY: json.dumps(info), f"{METADATA_KEY}.graph": graph, **props}


def read_metadata(model: onnx.ModelProto) -> dict:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise UserError("this ONNX file carries no fastddpm metadata; export it with `fastddpm export`")


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def write_validated(model: onnx.ModelProto, path: Path, check: Callable[[Path], None],
                    external_data_bytes: int = EXTERNAL_DATA_BYTES) -> bool:
    """Save `model` (and its .data sidecar if large) to `path` only once `check(staged)` passed.

    The files are staged in a temp folder beside `path` under their final names, so the sidecar
    reference inside the model is already right; then renamed, sidecar first. Returns whether
    external data was written. Saving moves large weights of `model` out to the sidecar: pass a
    proto you are done with."""
    path = check_writable_target(path)
    try:
        stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise UserError(f"cannot write into {path.parent}: {e.strerror}; choose another path") from None
    sidecar = path.name + ".data"
    external = _weight_bytes(model) > external_data_bytes
    try:
        staged = stage / path.name
        try:
            onnx.save_model(model, str(staged), save_as_external_data=external,
                            all_tensors_to_one_file=True, location=sidecar, size_threshold=1024)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}; choose another path") from None
        onnx.checker.check_model(str(staged), full_check=True)  # by path: works past 2 GB
        check(staged)
        if external:
            os.replace(stage / sidecar, path.parent / sidecar)
        os.replace(staged, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return external


def _cast(model: DiffusionModel, dtype: str) -> DiffusionModel:
    """A copy in `dtype` (casting in place would round the caller's weights for good; the
    trace sets the copy's kernel mode)."""
    unet = copy.deepcopy(model.unet).to("cpu", DTYPES[dtype]).eval()
    return DiffusionModel(unet, model.schedule, model.sampling)


def export_onnx(model: DiffusionModel, out: str | os.PathLike, options: OnnxOptions = OnnxOptions(),
                log: Callable[[str], None] | None = print, validate_with_ort: bool = True
                ) -> dict[str, Path]:
    """Export, validate and write the graphs `options.what` asks for; returns graph → path.
    `validate_with_ort=False` only for callers that validate what they build from it (TensorRT)."""
    opset = resolve_opset(options)
    if options.batch is not None and options.batch <= 0:
        raise UserError(f"batch must be positive or 'dynamic', got {options.batch}")
    paths = output_paths(out, options.what)
    for path in paths.values():  # fail before the slow trace, not after
        check_writable_target(path)
    if validate_with_ort:
        validation_device(options.dtype)
    table = model.table(options.sampling) if "step" in paths else None  # only the step graph has one
    reference = _cast(model, "fp32")  # validation compares against the fp32 model on the CPU
    lowered = _cast(model, options.dtype)
    dtype = DTYPES[options.dtype]
    for graph, path in paths.items():
        graph_table = table if graph == "step" else None
        proto = (graphs.eps_graph(lowered.unet, dtype, options.batch, opset) if graph == "eps"
                 else graphs.step_graph(lowered.unet, table, dtype, options.batch, opset))
        onnx.helper.set_model_props(proto, metadata(model, graph, options, opset, graph_table))
        proto.producer_name = "fastddpm"

        def check(staged: Path, graph=graph, graph_table=graph_table, path=path) -> None:
            if not validate_with_ort:
                return
            report = validate(staged, reference.unet, graph, options.dtype, options.batch, graph_table)
            if log is not None:
                log(f"{path.name}: {report}")

        external = write_validated(proto, path, check, options.external_data_bytes)
        if log is not None:
            log(f"wrote {path}" + (f" (+ {path.name}.data)" if external else ""))
    return paths
