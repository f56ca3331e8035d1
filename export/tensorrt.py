"""`fastddpm export --format tensorrt` and the TensorRT runner, for TensorRT 10 and 11.

A thin layer over the ONNX export: the engine is parsed from our ONNX graph, so precision comes
from the graph's dtype (a strongly typed network — TensorRT 10.12 deprecated the precision
builder flags and 11 removed them), with one optimisation profile over the batch range. The
runner has the `OrtRunner` contract: name-based I/O (set_input_shape / set_tensor_address /
execute_async_v3) on torch buffers, on its own non-default stream. No binding indices, no
build_engine: both are gone since TensorRT 10.

TensorRT cannot be installed on the machines this was written on: this file is checked by
reading against the 10.x / 11.x Python API, and its tests skip without TensorRT.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from fastddpm.errors import UserError
from fastddpm.files import atomic_write, check_writable_target
from fastddpm.model import DiffusionModel

from .onnx import OnnxOptions, export_onnx, output_paths
from .runners import check_batch
from .validate import compare

INSTALL_HINT = "pip install tensorrt on a machine with an NVIDIA GPU"
WORKSPACE_BYTES = 4 << 30


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"TensorRT is not installed here; {INSTALL_HINT}") from None
    return tensorrt


def _require_gpu() -> None:
    if not torch.cuda.is_available():
        raise UserError("TensorRT builds and runs engines on an NVIDIA GPU and none is visible; "
                        "run this on a GPU machine")


def _network_flags(trt) -> int:
    # 10.x: opt in to strong typing; 11.x: always strongly typed (flag deprecated, may be gone)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, plan_path: Path, batch_range: tuple[int, int],
                 workspace_bytes: int = WORKSPACE_BYTES) -> None:
    """Serialize an engine for `onnx_path` to `plan_path`; dynamic-batch inputs get the profile
    (min, opt, max) = (low, high, high) over batch_range = (low, high)."""
    trt = require_tensorrt()
    _require_gpu()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves a .data sidecar beside the model
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    # fp32 graphs mean fp32: TF32 (on by default) would round matmul/conv inputs to 10 bits;
    # the speed comes from exporting fp16/bf16 instead
    config.clear_flag(trt.BuilderFlag.TF32)
    low, high = batch_range
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape and shape[0] == -1:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(tensor.name, (low, *rest), (high, *rest), (high, *rest))
    if dynamic:
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why)")
    Path(plan_path).write_bytes(bytes(plan))


class TensorRTRunner:
    """A deserialized engine with name-based I/O on torch CUDA tensors."""

    def __init__(self, plan_path: str | Path, device: torch.device):
        trt = require_tensorrt()
        if device.type != "cuda":
            raise UserError("the tensorrt backend runs on an NVIDIA GPU; pass --device cuda")
        self.path, self.device = Path(plan_path), device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # kept: the engine must not outlive it
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.path} is not an engine this TensorRT can load (built by another "
                            "TensorRT version or GPU?); rebuild it with fastddpm export")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16,
                  trt.bfloat16: torch.bfloat16, trt.int64: torch.int64}
        self.output_dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in self.output_names}
        batch = self.engine.get_tensor_shape("x")[0]
        if batch == -1:
            low, _, high = self.engine.get_tensor_profile_shape("x", 0)
            self.batch_range = (low[0], high[0])
        else:
            self.batch_range = (batch, batch)
        self._stream = torch.cuda.Stream(device)  # TensorRT warns that the default stream syncs

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_batch(inputs["x"].shape[0], *self.batch_range, self.path.name)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        held = []
        for name in self.input_names:
            t = inputs[name].to(self.device).contiguous()
            held.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            # resolved from the input shapes just set (the ε graph of a learned variance: 2C)
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.output_dtypes[name],
                              device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}")
        current.wait_stream(self._stream)
        for t in (*held, *outs.values()):  # keep the allocator from reusing them mid-run
            t.record_stream(self._stream)
        return outs


def export_tensorrt(model: DiffusionModel, out: str | os.PathLike, options: OnnxOptions,
                    max_batch: int) -> dict[str, Path]:
    """ONNX (temp) → engine → validated against PyTorch → `out`, written atomically."""
    require_tensorrt()
    _require_gpu()
    batch_range = (options.batch, options.batch) if options.batch else (1, max_batch)
    paths = output_paths(out, options.what)
    for path in paths.values():
        check_writable_target(path)
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory(prefix="fastddpm-trt-") as workdir:
        for graph, path in paths.items():
            onnx_path = Path(workdir) / f"{graph}.onnx"
            export_onnx(model, onnx_path, replace(options, what=graph), log=None,
                        validate_with_ort=False)
            table = model.table(options.sampling) if graph == "step" else None
            with atomic_write(path) as staged:
                build_engine(onnx_path, staged, batch_range)
                runner = TensorRTRunner(staged, device)
                reference = copy.deepcopy(model.unet).to("cpu", torch.float32).eval()

                def run(runner=runner, **inputs):
                    return {k: v.cpu() for k, v in runner(**inputs).items()}

                # a dynamic engine is checked inside its profile, at a batch it was not traced at
                batch = options.batch or min(3, max_batch)
                abs_err, err, tol = compare(run, reference, graph, options.dtype, batch, table)
                verdict = (f"max abs error {abs_err:.2e} against PyTorch fp32 on TensorRT "
                           f"(scaled {err:.2e}, tolerance {tol:.1e} for {options.dtype})")
                if not err <= tol:
                    raise UserError(f"the {graph} engine does not match PyTorch: {verdict}; "
                                    "nothing was written")
            print(f"{path.name}: validated, {verdict}\nwrote {path}")
    return paths
