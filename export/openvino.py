"""The openvino ε backend of the sampler (CPU only), registered with fastddpm.backends through an
entry point (pyproject.toml).

The U-Net is converted by OpenVINO's own converter straight from the torch module (a fp32 copy
with the reference norms, so it traces to standard ops), with a dynamic batch, and compiled for
the CPU plugin once per batch size it is called with, with that batch fixed: the plugin then picks
its kernels for the shape, where a dynamic batch runs the generic ones (one ε forward, 2 threads of
an AMD EPYC: bundled model batch 64 20.5 against 37.1 ms, batch 1 2.2 against 3.5; CIFAR-10 U-Net
batch 1 59.7 against 64.9, batch 16 920 against 969; bf16 alike). A compile takes 0.2-0.4 s, as
the dynamic one did; the last SHAPES_KEPT sizes stay compiled, each with its own copy of the
weights in the plugin's layout. One InferRequest per size serves every call; the inputs are
handed over as views of the torch tensors (share_inputs) and ε is copied once out of the
engine's output into a torch tensor.
The converted graph is kept as IR in the disk cache (fastddpm.disk_cache): a fresh process reads
it back instead of converting again.

Why from the torch module and not from our ONNX export (bundled model, 16², batch 64, fp32, an
"AMD EPYC" with 2 shared threads, one quick run each): converting + compiling the torch module
takes 1.9 s + 0.22 s; the ONNX path takes 8.1 s for export_onnx (its trace and ONNX Runtime
validation) + 0.7 s convert_model(path) (0.01 s core.read_model) + 0.16-0.27 s compile. A forward
is the same either way, 24-30 ms medians within this machine's noise (torch eager: 24-39 ms), and
both match torch fp32 to 2e-6.

Threads: INFERENCE_NUM_THREADS is the sampler's `threads` (SamplingOptions.threads, --threads;
default: the threads torch uses), the one threads knob whichever backend computes ε.

Precision: the engine's I/O is always f32; --dtype picks INFERENCE_PRECISION_HINT (f32, bf16,
f16), refused in one line where the CPU has no native support for it. In bf16 the plugin runs a
GroupNormalization node unfused, so a bf16 compile gets each rewritten as the MVN it is (see
`groupnorms_as_mvn`). x comes in the sampler's dtype and ε goes back in it. `--quantize int8`
compiles the int8 graph of fastddpm.export.quantize instead; what it leaves unquantized runs at
--dtype's precision.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections import OrderedDict

import numpy as np
import torch

from fastddpm import __version__, disk_cache
from fastddpm.backends import Backend, Denoiser, resolve_threads
from fastddpm.dtypes import QUANTIZATIONS, dtype_name
from fastddpm.errors import UserError, require_extra
from fastddpm.model import DiffusionModel
from fastddpm.sessions import model_hash

from .quantize import int8_graph_of

# --dtype → (INFERENCE_PRECISION_HINT, the OPTIMIZATION_CAPABILITIES entry it needs)
PRECISIONS = {torch.float32: ("f32", None), torch.bfloat16: ("bf16", "BF16"),
              torch.float16: ("f16", "FP16")}
SHAPES_KEPT = 4  # batch sizes kept compiled per denoiser (a CIFAR-10 U-Net's: ~190 MB each in f32)


def import_openvino():
    return require_extra("openvino", "openvino", "the openvino backend")


def compile_config(core, dtype: torch.dtype, threads: int) -> dict[str, object]:
    """The CPU plugin's config for `dtype`, or a one-line error where the CPU cannot run it."""
    if dtype not in PRECISIONS:
        raise UserError(f"the openvino backend runs fp32, bf16 or fp16, not {dtype}")
    hint, capability = PRECISIONS[dtype]
    if capability is not None and capability not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise UserError(f"this CPU has no native {dtype_name(dtype)} for OpenVINO; use --dtype fp32")
    return {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads}


@contextlib.contextmanager
def argv_without_verbose():
    """sys.argv without `--verbose` for the duration: OpenVINO's converter reads that flag from
    the command line (there it is fastddpm's) and then prints its arguments and timings to stdout,
    which is the command's, and traces Python's allocations all through the conversion."""
    argv = sys.argv
    sys.argv = [a for a in argv if a != "--verbose"]
    try:
        yield
    finally:
        sys.argv = argv


def _opset():
    """OpenVINO's op builders: a top-level module since 2025, under openvino.runtime before."""
    try:
        import openvino.opset13 as ops
    except ImportError:  # OpenVINO 2024.x, pyproject's floor
        import openvino.runtime.opset13 as ops
    return ops


def groupnorms_as_mvn(graph) -> int:
    """Rewrite each GroupNormalization of `graph`, in place, as what it computes, and return how
    many: the input reshaped to (N, groups, rest), MVN over `rest`, scaled and shifted by the
    per-channel weights spread over `rest`, the SiLU that follows (where one alone does) applied
    there too, and only then reshaped back. Why: in bf16 the CPU plugin runs a GroupNormalization
    node as separate unfused steps, while it fuses an MVN with its neighbours; and the affine and
    SiLU run many times faster on the grouped tensor's long rows than per channel on short planar
    ones (a 4×4 feature map). One ε forward in bf16, 2 threads of an AMD EPYC, interleaved: the
    bundled model at batch 64 13.7 ms, against 16.5 with the affine after the reshape and 20.8 with
    GroupNormalization kept; CIFAR-10 U-Net at batch 16 468 against 474 and 496. f32 runs its own
    GroupNormalization faster (bundled model, batch 64: 20.1 against 20.4 ms), so f32 graphs keep
    it. The channel and spatial sizes must be static; the batch may be dynamic."""
    ops = _opset()
    count = 0
    for node in graph.get_ordered_ops():
        if node.get_type_name() != "GroupNormalization":
            continue
        x, weight, bias = (node.input_value(i) for i in range(3))
        attrs = node.get_attributes()
        groups = attrs["num_groups"]
        channels, *spatial = [d.get_length() for d in list(x.get_partial_shape())[1:]]
        layout = (groups, channels // groups, int(np.prod(spatial, dtype=np.int64)))
        grouped, x = _grouped(ops, x, *layout)
        normed = ops.mvn(grouped, ops.constant(np.array([2], np.int64)), normalize_variance=True,
                         eps=attrs["epsilon"], eps_mode="inside_sqrt")
        h = ops.add(ops.multiply(normed, _spread_per_channel(ops, weight, *layout)),
                    _spread_per_channel(ops, bias, *layout))
        consumers = list(node.output(0).get_target_inputs())
        replaced = node
        if len(consumers) == 1 and consumers[0].get_node().get_type_name() == "Swish":
            replaced, h = consumers[0].get_node(), ops.swish(h)
        replaced.output(0).replace(ops.reshape(h, ops.shape_of(x), special_zero=False).output(0))
        count += 1
    graph.validate_nodes_and_infer_types()
    return count


def _grouped(ops, x, groups: int, per_group: int, size: int):
    """x as (N, groups, rest), and a tensor of x's shape to reshape the result back by. Where x
    is h + b with b one value per sample and channel, (N, C, 1, 1) — the time embedding a ResBlock
    adds before norm2 — the sum is taken on the grouped view instead, (N, groups, C/groups, H·W) +
    (N, groups, C/groups, 1), which the plugin fuses with the regrouping rather than adding in the
    convolution's layout and then reordering the sum (one ε forward, bundled model, batch 64, bf16,
    interleaved, two runs: 12.9 against 13.5 ms; batch 1 and the CIFAR-10 U-Net unchanged)."""
    def shaped(value, dims):
        return ops.reshape(value, ops.constant(np.array(dims, np.int64)), special_zero=True)

    summands = _sum_with_per_sample_bias(x)
    if summands is None:
        return shaped(x, [0, groups, -1]), x
    h, b = summands
    summed = ops.add(shaped(h, [0, groups, per_group, size]), shaped(b, [0, groups, per_group, 1]))
    return shaped(summed, [0, groups, -1]), h


def _sum_with_per_sample_bias(x):
    """(h, b) where x is the sum h + b (either order), used by nothing else, with h of x's shape
    and b computed, (N, C, 1, …); else None. (A constant b is a convolution's bias, which the
    plugin folds into the convolution.)"""
    node = x.get_node()
    if node.get_type_name() != "Add" or len(x.get_target_inputs()) != 1:
        return None
    shape = x.get_partial_shape()
    for h, b in ((node.input_value(0), node.input_value(1)), (node.input_value(1), node.input_value(0))):
        b_shape = b.get_partial_shape()
        if (h.get_partial_shape() == shape and b.get_node().get_type_name() != "Constant"
                and b_shape.rank == shape.rank and list(b_shape)[:2] == list(shape)[:2]
                and all(d.is_static and d.get_length() == 1 for d in list(b_shape)[2:])):
            return h, b
    return None


def _spread_per_channel(ops, values, groups: int, per_group: int, size: int):
    """A per-channel vector laid out as (1, groups, rest) to match the grouped tensor: each
    channel's value repeated over its feature map of `size` pixels (constant-folded when the graph
    compiles)."""
    by_group = ops.reshape(values, ops.constant(np.array([groups, per_group, 1], np.int64)),
                           special_zero=False)
    spread = ops.broadcast(by_group, ops.constant(np.array([groups, per_group, size], np.int64)))
    return ops.reshape(spread, ops.constant(np.array([1, groups, -1], np.int64)), special_zero=False)


def convert(model: DiffusionModel):
    """The ε graph as an openvino.Model with a dynamic batch, and the torch copy whose weights
    it shares (it must outlive the compiled model)."""
    ov = import_openvino()
    cfg = model.unet.config
    unet = copy.deepcopy(model.unet).float().set_kernels("reference").eval()
    shape = [cfg.in_channels, cfg.image_size, cfg.image_size]
    example = (torch.randn(2, *shape), torch.zeros(2, dtype=torch.int64))
    # the converter traces with torch.jit: its deprecation notice and the tracer's note on
    # GroupNorm's batch-size check (a shape check, not data flow) are noise to a user
    with torch.no_grad(), warnings.catch_warnings(), argv_without_verbose():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace", category=DeprecationWarning)
        graph = ov.convert_model(unet, example_input=example,
                                 input=[("x", ov.PartialShape([-1, *shape]), ov.Type.f32),
                                        ("t", ov.PartialShape([-1]), ov.Type.i64)])
    return graph, unet


def graph_of(model: DiffusionModel):
    """The converted ε graph (`convert`'s pair), read back from the disk cache when an entry for
    this model, OpenVINO version and fastddpm version is there (the torch copy is then None: the
    graph owns its weights), else converted and stored there."""
    ov = import_openvino()
    # the IR holds f32 weights whatever --dtype (precision is a compile-time hint), so one entry
    # serves every dtype
    key = {"model": model_hash(model), "openvino": ov.__version__, "fastddpm": __version__}
    folder = disk_cache.load("openvino", key)
    if folder is not None:
        return ov.Core().read_model(folder / "eps.xml"), None
    graph, unet = convert(model)
    disk_cache.store("openvino", key,
                     lambda d: ov.save_model(graph, d / "eps.xml", compress_to_fp16=False))
    return graph, unet


class OpenVINODenoiser:
    """`denoise(x, t)`: ε by the CPU plugin, compiled for each batch size as it first comes."""

    def __init__(self, core, graph, config: dict[str, object], keep):
        self.core, self.graph, self.config = core, graph, config
        # the converted graph shares the torch copy's weights (convert_model's share_weights), and
        # the CPU plugin may keep using constant memory in place: both live as long as we do
        self.keep = keep
        self.requests: OrderedDict[int, object] = OrderedDict()  # batch → InferRequest
        self.compiles = 0

    def request(self, batch: int):
        """The InferRequest of the graph compiled for `batch` images (compiled now if it is not
        one of the last SHAPES_KEPT sizes)."""
        if batch in self.requests:
            self.requests.move_to_end(batch)
            return self.requests[batch]
        # the image's dimensions as ints: OpenVINO 2024.0's PartialShape takes no slice
        image = [d.get_length() for d in list(self.graph.input("x").get_partial_shape())[1:]]
        graph = self.graph.clone()
        graph.reshape({"x": [batch, *image], "t": [batch]})
        if self.config["INFERENCE_PRECISION_HINT"] == "bf16":
            groupnorms_as_mvn(graph)
        self.requests[batch] = self.core.compile_model(graph, "CPU", self.config).create_infer_request()
        self.compiles += 1
        while len(self.requests) > SHAPES_KEPT:
            self.requests.popitem(last=False)
        return self.requests[batch]

    def compiled(self, batch: int):
        """The compiled model for `batch` images: its properties and runtime graph, for callers
        and tests."""
        return self.request(batch).get_compiled_model()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        ts = np.ascontiguousarray(t.detach().to("cpu", torch.int64).numpy())
        # inputs as views of the torch memory; the output a view of the engine's buffer, which the
        # next call overwrites: one copy (and cast) into a tensor of ours
        out = self.request(x.shape[0]).infer({"x": xs, "t": ts}, share_inputs=True, share_outputs=True)[0]
        eps = torch.from_numpy(out)
        return eps.clone() if x.dtype == torch.float32 else eps.to(x.dtype)


def make(model: DiffusionModel, device: torch.device, dtype: torch.dtype,
         threads: int | None = None, quantize: str | None = None) -> Denoiser:
    device = torch.device(device)
    if device.type != "cpu":  # before anything touches the device
        raise UserError("the openvino backend runs on the CPU; pass --device cpu or use --backend torch")
    ov = import_openvino()
    core = ov.Core()
    config = compile_config(core, dtype, resolve_threads(threads))
    if quantize is None:
        graph, keep = graph_of(model)
    else:
        graph, keep = int8_graph_of(model, resolve_threads(threads), lambda: graph_of(model))
    return OpenVINODenoiser(core, graph, config, keep)


OPENVINO = Backend("openvino", make, quantizations=QUANTIZATIONS, bf16_when_auto=True)
