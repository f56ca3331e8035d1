"""`fastddpm eval`: are a digits model's samples recognisable digits? With `--bpd`: the model's
negative log-likelihood bound on real images, in bits/dim (fastddpm.likelihood).

A small classifier (scikit-learn MLP, one hidden layer) is trained on the training split of the
real digits at the model's size. Over `num` samples we report:
- mean top-class probability (confidence that a sample is *some* digit);
- the fraction of samples per predicted class (are all ten digits drawn?);
- the Fréchet distance between the classifier's hidden features of the samples and of the
  held-out real digits, against the real-vs-real baseline: the same distance for random subsets
  of the real training digits of the same size (so both sides carry the same small-sample bias).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from . import data
from .checkpoint import load
from .errors import UserError, require_extra
from .images import check_output, save
from .likelihood import bits_per_dim
from .runtime import sample
from .samplers import SAMPLERS

NUM_CLASSES = 10
BASELINE_SUBSETS = 5


class DigitClassifier:
    """MLP on flattened (S×S) digits in [−1, 1]; hidden ReLU activations serve as features."""

    def __init__(self, size: int, seed: int = 0):
        networks = require_extra("sklearn.neural_network", "train", "the digits classifier")
        self.data = data.digits(size)
        self.mlp = networks.MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600,
                                          random_state=seed)
        self.mlp.fit(self._flat(self.data.train), self.data.labels_train.numpy())

    @staticmethod
    def _flat(x: torch.Tensor) -> np.ndarray:
        return x.reshape(len(x), -1).double().numpy()

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        return self.mlp.predict_proba(self._flat(x))

    def features(self, x: torch.Tensor) -> np.ndarray:
        h = self._flat(x) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(h, 0.0)

    def heldout_accuracy(self) -> float:
        pred = self.probabilities(self.data.heldout).argmax(1)
        return float((pred == self.data.labels_heldout.numpy()).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) for feature rows a (N, D), b (M, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def digit_metrics(samples: torch.Tensor, classifier: DigitClassifier, seed: int = 0) -> dict:
    """The three measures for `samples` (N, 1, S, S) in [−1, 1]."""
    probs = classifier.probabilities(samples)
    counts = np.bincount(probs.argmax(1), minlength=NUM_CLASSES)
    held = classifier.features(classifier.data.heldout)
    fd = frechet_distance(classifier.features(samples), held)
    rng = np.random.default_rng(seed)
    train = classifier.data.train
    n = min(len(samples), len(train))
    subsets = [train[rng.choice(len(train), n, replace=False)] for _ in range(BASELINE_SUBSETS)]
    baseline = float(np.mean([frechet_distance(classifier.features(s), held) for s in subsets]))
    return {"num": len(samples), "mean_top_probability": float(probs.max(1).mean()),
            "class_fractions": (counts / len(samples)).round(4).tolist(),
            "min_class_fraction": float(counts.min() / len(samples)),
            "frechet_distance": fd, "frechet_baseline_real_vs_real": baseline,
            "frechet_ratio": fd / baseline, "classifier_heldout_accuracy": classifier.heldout_accuracy()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="a model (default: the bundled digits one)")
    p.add_argument("--num", type=int, default=None,
                   help="samples to draw (default 1000); with --bpd, images to measure (default: all)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's T")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: ddpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=None)
    p.add_argument("--grid", default=None, help="also write the first 100 samples as a PNG grid")
    p.add_argument("--bpd", action="store_true",
                   help="measure the variational bound on -log p(x) in bits/dim on --data instead "
                        "(all T terms: num × T ε evaluations)")
    p.add_argument("--data", default="digits",
                   help="with --bpd: 'digits', a folder of images, a CIFAR-10 python folder or an .npz")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="with --bpd")


def run(args: argparse.Namespace) -> int:
    if args.num is not None and args.num <= 0:
        raise UserError(f"--num must be positive, got {args.num}")
    result = _bits_per_dim(args) if args.bpd else _sample_metrics(args)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def _bits_per_dim(args: argparse.Namespace) -> dict:
    if args.steps is not None or args.sampler is not None or args.grid is not None:
        raise UserError("--steps, --sampler and --grid are for sample metrics; --bpd runs all T "
                        "terms of the bound")
    model = load(args.model)
    cfg = model.config
    ds = data.load(args.data, cfg.image_size, cfg.in_channels)
    images = ds.heldout if args.split == "heldout" else ds.train
    if len(images) == 0:
        raise UserError(f"the {args.split} split of {args.data} is empty; choose the other --split")
    num = len(images) if args.num is None else args.num
    if num > len(images):
        raise UserError(f"the {args.split} split of {args.data} has {len(images)} image(s); "
                        f"ask for at most that many with --num")
    start = time.perf_counter()
    bound = bits_per_dim(model, images[:num], seed=args.seed, device=args.device,
                         batch_size=args.batch_size, progress=True)
    return {"model": args.model, "data": args.data, "split": args.split, "seed": args.seed,
            "seconds": round(time.perf_counter() - start, 1), **bound.summary()}


def _sample_metrics(args: argparse.Namespace) -> dict:
    if args.grid:
        check_output(args.grid)  # before minutes of sampling, not after
    model = load(args.model)
    cfg = model.config
    if cfg.in_channels != 1:
        raise UserError("eval measures digits models: the model must have 1 channel")
    classifier = DigitClassifier(cfg.image_size)
    sampler = args.sampler or "ddpm"
    start = time.perf_counter()
    x = sample(model, num=args.num or 1000, steps=args.steps, sampler=sampler, seed=args.seed,
               device=args.device, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - start
    if args.grid:
        save(x[:100], args.grid)
    return {"model": args.model, "sampler": sampler,
            "steps": args.steps or model.schedule.num_timesteps, "seed": args.seed,
            "sampling_seconds": round(seconds, 1), **digit_metrics(x, classifier, args.seed)}
