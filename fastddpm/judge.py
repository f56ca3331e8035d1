"""The digits judge: are a digits model's samples recognisable digits, and how close to real?

A small classifier (scikit-learn MLP, one hidden layer) is trained on the training split of the
real digits at the model's size. Over a set of samples it reports:
- mean top-class probability (confidence that a sample is *some* digit);
- the fraction of samples per predicted class (are all ten digits drawn?);
- the Fréchet distance between the classifier's hidden features of the samples and of the
  held-out real digits, against the real-vs-real baseline: the same distance for random subsets
  of the real training digits of the same size (so both sides carry the same small-sample bias).
"""
from __future__ import annotations

import numpy as np
import torch

from . import data
from .errors import require_extra

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
