"""`Pipeline`: a model and how to sample it, held by the caller — the explicit form of the sessions
that `fastddpm.sample()` keeps by itself (fastddpm.sessions).

    pipe = fastddpm.Pipeline("model.pt", backend="openvino", device="cpu", dtype="bf16")
    images = pipe.sample(64, seed=0)               # builds the engine once
    more = pipe.sample(64, seed=1, steps=50)       # same engine, a new table

Its Samplers (engine, table, CUDA graphs) live as long as the object, one per set of options.
"""
from __future__ import annotations

import torch

from .model import DiffusionModel
from .options import MAX_BATCH, SamplingOptions
from .runtime import Sampler, check_request, draw


class Pipeline:
    """`model`: a DiffusionModel, a model path, or None / 'default' (the bundled digits model);
    `options` or its fields as keywords: the defaults of every `sample` call."""

    def __init__(self, model: DiffusionModel | str | None = None,
                 options: SamplingOptions | None = None, **choices):
        from .checkpoint import load

        self.options = SamplingOptions.of(options, **choices)
        self.model = model if isinstance(model, DiffusionModel) else load(model or "default")
        self._samplers: dict[SamplingOptions, Sampler] = {}

    def sampler(self, options: SamplingOptions | None = None) -> Sampler:
        """The Sampler of `options` (default: the pipeline's), built on first use."""
        options = options or self.options
        if options not in self._samplers:
            self._samplers[options] = Sampler(self.model, options)
        return self._samplers[options]

    def sample(self, num: int = 64, seed: int = 0, progress: bool = False,
               **choices) -> torch.Tensor:
        """`num` images (num, C, H, W), float32 on the CPU, in [−1, 1]; `choices` override the
        pipeline's options for this call (`steps=50`). Sample k of seed s is the same image
        whatever the batch size."""
        options = self.options.replace(**choices) if choices else self.options
        check_request(num, seed, self.model, batch=min(num, options.batch_size or MAX_BATCH))
        return draw(self.sampler(options), seed, options.batches(num), progress)
