"""Is one sampler step (ε and the update) faster as one compiled OpenVINO model than the runtime's
loop (the ε graph compiled by the openvino backend, the update in torch)? Issue 14 asks for the
whole step wherever it is faster; a probe, not an engine.

The whole step: the openvino backend's ε graph (`graph_of`; GroupNorms rewritten in bf16, as the
backend does) with the plain reference update (`kernels.reverse_step_reference`, converted by
OpenVINO from torch) appended, its table row an input, compiled once for the batch; x stays a
float32 array between steps. The loop: `Sampler(backend="openvino")`, what `fastddpm sample` runs.
Both run DDIM (η = 0, trailing spacing, clipped x̂0): no noise and no history, so this is the best
case for the whole step — other samplers add inputs (z, the history ring) to it. Each round times
one run of `--steps` steps per engine, engines in turn, a pause between them (no pool spins into
the next), in one process; a case's figure is the median over rounds of per-step ms, and the
speed-up the median of per-round ratios. Also reported: the largest difference between the two
engines' x_0 from the same x_T (OpenVINO runs the appended update at the compile's precision).

    python benchmarks/whole_step_probe.py --out benchmarks/results/cpu-20261205/whole_step_probe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fastddpm.export.openvino import PRECISIONS, graph_of, groupnorms_as_mvn
from fastddpm.kernels import reverse_step_reference
from fastddpm.model import DiffusionModel
from fastddpm.runtime import Sampler

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampler import CPU_CASES, _cpu_model  # noqa: E402
from int8_probe import machine  # noqa: E402


class Update(torch.nn.Module):
    """The reference update of one table row, as OpenVINO converts it."""

    def __init__(self, clip: bool):
        super().__init__()
        self.clip = clip

    def forward(self, x, eps, row):
        return reverse_step_reference(x, eps, row, clip=self.clip)[0]


def whole_step(model: DiffusionModel, sampler: Sampler, batch: int, dtype: torch.dtype):
    """`run(x_T)` → x_0 by the ε graph and the update compiled as one model."""
    import openvino as ov

    image = list(sampler.image_shape)
    graph = graph_of(model)[0].clone()
    graph.reshape({"x": [batch, *image], "t": [batch]})
    if dtype == torch.bfloat16:
        groupnorms_as_mvn(graph)
    row_size = sampler.coef.shape[1]
    with warnings.catch_warnings():  # the tracer on the row's d columns: none is read here
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        update = ov.convert_model(Update(sampler.table.clip), example_input=(
            torch.randn(batch, *image), torch.randn(batch, *image), torch.randn(row_size)))
    x_in, eps_in, row_in = update.get_parameters()
    eps_in.output(0).replace(graph.get_results()[0].input_value(0))  # ε flows into the update
    x_in.output(0).replace(graph.input("x").get_node().output(0))    # both read the same x
    step = ov.Model(update.get_results(), [graph.input("x").get_node(), graph.input("t").get_node(), row_in])
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[dtype][0], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    request = ov.Core().compile_model(step, "CPU", config).create_infer_request()
    rows = sampler.coef.numpy()
    timesteps = [np.full(batch, t, np.int64) for t in sampler.timesteps.tolist()]

    def run(x_T: torch.Tensor) -> torch.Tensor:
        x = x_T.float().numpy().copy()
        for t, row in zip(timesteps, rows, strict=True):
            out = request.infer({0: x, 1: t, 2: row}, share_inputs=True, share_outputs=True)[0]
            np.copyto(x, out)
        return torch.from_numpy(x)
    return run


def probe(case: str, dtype_name: str, args) -> dict:
    config, batch = CPU_CASES[case]
    model = _cpu_model(config)
    sampler = Sampler(model, sampler="ddim", steps=args.steps, spacing="trailing", device="cpu",
                      backend="openvino", dtype=dtype_name)
    x_T = sampler.initial_noise(0, 0, batch)
    engines = {"loop": lambda: sampler.run(0, 0, batch, x_start=x_T),
               "whole-step": partial(whole_step(model, sampler, batch, sampler.dtype), x_T)}
    finals = {name: run().float() for name, run in engines.items()}  # warm-up, and x_0
    per_round: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, run in engines.items():
            time.sleep(args.pause)
            start = time.perf_counter()
            run()
            per_round[name].append(1e3 * (time.perf_counter() - start) / args.steps)
    ratios = [a / b for a, b in zip(per_round["loop"], per_round["whole-step"], strict=True)]
    return {"case": case, "dtype": dtype_name, "batch": batch,
            "ms_per_step": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
            "whole_step_speedup": round(statistics.median(ratios), 3),
            "speedup_per_round": [round(r, 3) for r in ratios],
            "x0_max_abs_diff": float((finals["loop"] - finals["whole-step"]).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="digits-b1,digits-b64,cifar10-b1,cifar10-b16",
                   help=f"of {', '.join(CPU_CASES)} (bench_sampler.py's)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--pause", type=float, default=0.2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import openvino as ov

    results = {"machine": machine(), "torch": torch.__version__, "openvino": ov.__version__,
               "threads": torch.get_num_threads(), "command": " ".join(sys.argv), "cases": []}
    for case in args.cases.split(","):
        for dtype_name in args.dtypes.split(","):
            results["cases"].append(probe(case, dtype_name, args))
            print(json.dumps(results["cases"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
