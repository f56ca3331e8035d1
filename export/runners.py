"""Runners over exported graphs: name-based I/O on torch tensors, one interface for every engine.

`runner(**inputs) -> {output name: tensor}` with inputs named as in onnx_graphs (x, t / x, step,
noise[, x0_history | eps_history]); every output has x's batch and the graph's own other sizes
(those of x, but 2C channels for the ε graph of a learned-variance model). `OrtRunner` runs ONNX
Runtime with IOBinding on torch buffers, on the CPU and on CUDA alike; `tensorrt.TensorRTRunner`
is the same contract over a TensorRT engine. `export.backend` turns either into a `denoise(x, t)` backend.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fastddpm.errors import UserError

ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
              "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64}
# element types for IOBinding: numpy types, and ONNX's type number for bfloat16 (numpy has none)
BIND_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
              torch.bfloat16: 16}  # onnx.TensorProto.BFLOAT16


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed; pip install 'fastddpm[onnx]' "
                        "(or 'fastddpm[onnx-gpu]' on a machine with an NVIDIA GPU)") from None
    return onnxruntime


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises for a file or graph it refuses (its own pybind
    classes, one per status code)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as status

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(status, name) for name in names if hasattr(status, name))


def check_batch(batch: int, low: int, high: int, artifact: str) -> None:
    """One line when a batch falls outside what an artifact was built for."""
    if not low <= batch <= high:
        allowed = f"batch {low}" if low == high else f"batches {low}..{high}"
        raise UserError(f"{artifact} was built for {allowed}, got {batch}; re-export it with "
                        f"--batch {batch} (or --batch dynamic)")


def _session_error(error: Exception, path: Path, provider: str) -> UserError:
    text = str(error)
    missing = re.search(r"Could not find an implementation for (\S+) node", text)
    if missing:
        return UserError(f"ONNX Runtime's {provider} has no kernel for {missing.group(1)} in the "
                         f"dtype of {path.name}; run fp16/bf16 graphs where they have kernels "
                         "(a GPU with onnxruntime-gpu, or TensorRT) or export --dtype fp32")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    return UserError(f"ONNX Runtime cannot load {path}: {first}")


class OrtRunner:
    """An ONNX Runtime session with name-based I/O on torch tensors."""

    def __init__(self, path: str | Path, device: torch.device | None = None,
                 threads: int | None = None):
        ort = import_onnxruntime()
        device = device if device is not None else torch.device("cpu")
        self.path, self.device = Path(path), device
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; failures surface as exceptions below
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device.type == "cpu":
            # one pool of `threads` workers (default: the threads torch uses) that sleeps between
            # calls: spinning after a call would fight torch's pool, which runs the reverse step
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif threads:
            options.intra_op_num_threads = threads
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("this ONNX Runtime has no CUDA execution provider; "
                                "pip install onnxruntime-gpu (instead of onnxruntime)")
            # ORT launches on our own non-default stream; __call__ orders it after torch's
            self._stream = torch.cuda.Stream(device)
            providers = [("CUDAExecutionProvider", {
                "device_id": device.index or 0,
                "user_compute_stream": str(self._stream.cuda_stream)})]
        else:
            providers = ["CPUExecutionProvider"]
        provider = providers[0] if isinstance(providers[0], str) else providers[0][0]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except onnxruntime_errors() as e:
            raise _session_error(e, self.path, provider) from None
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = {o.name: ORT_DTYPES[o.type] for o in self.session.get_outputs()}
        # every size but the batch is fixed in our graphs (onnx_graphs traces only the batch)
        self.output_sizes = {o.name: tuple(o.shape[1:]) for o in self.session.get_outputs()}
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """IOBinding: ORT reads the torch inputs and writes torch outputs in place, no copies."""
        batch = inputs["x"].shape[0]
        if self.fixed_batch is not None:
            check_batch(batch, self.fixed_batch, self.fixed_batch, self.path.name)
        cuda = self.device.type == "cuda"
        if cuda and torch.cuda.is_current_stream_capturing():
            raise UserError("the onnxruntime backend cannot run inside a CUDA graph capture; "
                            "call it outside one (the sampler does so by itself)")
        where = (self.device.type, self.device.index or 0)
        binding = self.session.io_binding()
        if cuda:
            current = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(current)
        held = []  # the bound inputs stay alive until ORT has read them
        for name in self.input_names:
            t = inputs[name].detach().to(self.device).contiguous()
            held.append(t)
            binding.bind_input(name, *where, BIND_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        outs = {}
        for name in self.output_names:
            out = torch.empty((batch, *self.output_sizes[name]), dtype=self.output_dtypes[name],
                              device=self.device)
            binding.bind_output(name, *where, BIND_TYPES[out.dtype], tuple(out.shape), out.data_ptr())
            outs[name] = out
        self.session.run_with_iobinding(binding)  # synchronises ORT's stream before returning
        if cuda:
            current.wait_stream(self._stream)
        return outs
