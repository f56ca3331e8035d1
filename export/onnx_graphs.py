"""The two exported graphs as torch modules, and their trace to an ONNX ModelProto.

ε graph:    x (B, C, H, W), t int64 (B,)                      → eps (B, C, H, W)
step graph: x (B, C, H, W), step int64 (1,), noise (B, C, H, W)
            [, x0_history | eps_history (K, B, C, H, W) for multistep samplers]
            → x_prev, x0 [, eps with eps_history] (B, C, H, W)

The ε graph is the network's raw output: 2C channels for a learned variance. The step graph
splits it inside (fastddpm/variance.py), so its inputs and outputs keep the image's C.

The step graph carries the sampler table (timesteps and coefficients) as constants, so a host
needs only `for step in range(S): x, x0 = run(x, step, noise_step)`; t = timesteps[step] and the
update of `kernels.reverse_step_reference` happen inside. A multistep sampler (K = its
`table.history` > 0) also reads the x̂0 ring of the runtime's kernel: the x0 of step s in slot
s mod K, zero before the first step — the host writes each step's x0 output into slot step mod K
(x̂0 itself, also where the table clips to [−r, r]: the graph scales by the table's x0_scale).
A table with an ε history (iPNDM; metadata `history_kind` "eps") reads `eps_history` instead, a
ring of the model's ε, and returns that ε as a third output, which the host keeps the same way.
No If/Loop/Scan: the ORT CUDA EP and TensorRT can graph-capture it. GroupNorm becomes ONNX
GroupNormalization (per-channel scale and bias) from opset 21 and an InstanceNormalization
decomposition below that; either way its statistics are computed in float32, also in fp16/bf16
graphs (the reference casts up first).
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings

import onnx
import torch
from torch import nn

from fastddpm import kernels
from fastddpm.kernels.reverse_step import ring_history
from fastddpm.samplers import SamplerTable
from fastddpm.unet import UNet
from fastddpm.variance import split_output

EPS_INPUTS, EPS_OUTPUTS = ("x", "t"), ("eps",)
STEP_INPUTS, STEP_OUTPUTS = ("x", "step", "noise", "x0_history"), ("x_prev", "x0")
# the ring's input and the output the host writes into it, by the table's history_kind
HISTORY_IO = {"x0": ("x0_history", "x0"), "eps": ("eps_history", "eps")}
GROUPNORM_NATIVE_OPSET = 21  # GroupNormalization with per-channel scale/bias (18 had per-group)
MIN_OPSET = 18  # the torch.onnx (dynamo) exporter's own opset; older ones it cannot write
BF16_MIN_OPSET = 22  # Conv, Gemm and InstanceNormalization accept bfloat16 from opset 22
TRACE_BATCH = 2  # torch.export specialises a batch of 1 to a constant


class StepGraph(nn.Module):
    """One reverse step with the ε-model inside: what the step graph computes."""

    def __init__(self, unet: UNet, table: SamplerTable):
        super().__init__()
        self.unet = unet
        self.register_buffer("timesteps", table.timesteps.clone())
        # float32 like the runtime's device table; the step arithmetic is float32 in every dtype
        self.register_buffer("coef", table.coef.to(torch.float32))
        self.clip = table.clip
        self.learned_variance = table.learned_variance
        # the kernel's x̂0 is x̂0/x0_scale (samplers.with_clip_range): the x0 output is x̂0 itself,
        # and an x̂0 ring the host fills from it is scaled back before the step reads it
        self.x0_scale = table.x0_scale

    def forward(self, x: torch.Tensor, step: torch.Tensor, noise: torch.Tensor,
                x0_history: torch.Tensor | None = None, eps_history: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ...]:
        t = self.timesteps.index_select(0, step).expand(x.shape[0])
        eps, w = split_output(self.unet(x, t), x.shape[1], self.learned_variance)
        row = self.coef.index_select(0, step).squeeze(0)
        ring = x0_history if eps_history is None else eps_history
        if x0_history is not None and self.x0_scale != 1.0:
            ring = ring / self.x0_scale
        past = ring_history(ring, step) if ring is not None else None
        x_prev, x0 = kernels.reverse_step_reference(x, eps, row, noise, past, self.clip, w,
                                                    eps_history=eps_history is not None)
        if self.x0_scale != 1.0:
            x0 = x0 * self.x0_scale
        return (x_prev, x0) if eps_history is None else (x_prev, x0, eps)


def step_outputs(table: SamplerTable) -> tuple[str, ...]:
    """The step graph's outputs: x_prev, x0, and eps where the host keeps an ε ring."""
    return STEP_OUTPUTS + (("eps",) if table.history and table.history_kind == "eps" else ())


def example_inputs(graph: str, image_shape: tuple[int, ...], batch: int, dtype: torch.dtype,
                   num_steps: int = 1, history: int = 0,
                   generator: torch.Generator | None = None,
                   history_kind: str = "x0") -> dict[str, torch.Tensor]:
    """Random inputs (never zeros) for the ε or step graph, by input name; `history` slots of
    x̂0 ring (ε ring: history_kind "eps") for a multistep sampler's step graph."""
    def image(*lead: int) -> torch.Tensor:
        return torch.randn((*lead, batch, *image_shape), generator=generator).to(dtype)

    if graph == "eps":
        return {"x": image(), "t": torch.randint(0, 1000, (batch,), generator=generator)}
    inputs = {"x": image(), "step": torch.randint(0, num_steps, (1,), generator=generator),
              "noise": image()}
    if history:
        inputs[HISTORY_IO[history_kind][0]] = image(history)
    return inputs


def _attention_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """softmax(q kᵀ · scale) v: the exporter only translates 4-D SDPA, the U-Net's is 3-D."""
    assert attn_mask is None and not is_causal and dropout_p == 0.0
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1) @ v


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a line per missing torchvision op and warns per constant; hide that."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def trace_to_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: tuple[str, ...],
                  opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """torch.export the module on `inputs` (names = forward's argument names) → ONNX at `opset`."""
    batch = torch.export.Dim("batch", min=1, max=4096) if dynamic_batch else None
    batch_dim = {"step": None, "x0_history": 1, "eps_history": 1}  # the ring's slots come first
    dynamic_shapes = {name: ({batch_dim.get(name, 0): batch} if batch is not None and name != "step"
                             else None) for name in inputs}
    with _quiet_exporter(), torch.no_grad():
        program = torch.export.export(module, (), kwargs=inputs, dynamic_shapes=dynamic_shapes)
        program = program.run_decompositions(
            {torch.ops.aten.scaled_dot_product_attention.default: _attention_math})
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                         input_names=list(inputs), output_names=list(output_names),
                                         verbose=False)
    return onnx_program.model_proto


def _trace_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # leaves the caller's global RNG state alone


def eps_graph(unet: UNet, dtype: torch.dtype, batch: int | None, opset: int) -> onnx.ModelProto:
    """The ε-model; batch None = dynamic. `unet` runs its reference kernels: the fused ones are
    custom ops the exporter cannot see into."""
    unet.set_kernels("reference")
    cfg = unet.config
    inputs = example_inputs("eps", (cfg.in_channels, cfg.image_size, cfg.image_size),
                            batch or TRACE_BATCH, dtype, generator=_trace_generator())
    return trace_to_onnx(unet, inputs, EPS_OUTPUTS, opset, batch is None)


def step_graph(unet: UNet, table: SamplerTable, dtype: torch.dtype, batch: int | None,
               opset: int) -> onnx.ModelProto:
    """One reverse step of `table` around the ε-model; batch None = dynamic. `unet` runs its
    reference kernels, as in eps_graph."""
    unet.set_kernels("reference")
    cfg = unet.config
    module = StepGraph(unet, table).eval()
    inputs = example_inputs("step", (cfg.in_channels, cfg.image_size, cfg.image_size),
                            batch or TRACE_BATCH, dtype, table.num_steps, table.history,
                            generator=_trace_generator(), history_kind=table.history_kind)
    return trace_to_onnx(module, inputs, step_outputs(table), opset, batch is None)
