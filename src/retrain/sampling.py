"""Which training images a step or an epoch sees, by the ``--class_balance`` policy.

One sampler for the new layer (batches drawn with replacement) and fine-tuning (epochs):

* ``sample`` (retrain.py's behaviour, the default): a class uniformly, then one of its images;
* ``weight``: images uniformly, the loss weighted by inverse class frequency;
* ``none``: images uniformly, equal weights.
"""

from __future__ import annotations

import numpy as np

CLASS_BALANCE = ("sample", "weight", "none")


class ClassBalancedSampler:
    """Draws indices into the labels ``y`` (N,) by ``policy``; ``weights`` (N,) are the loss weights."""

    def __init__(self, y: np.ndarray, n_classes: int, policy: str):
        if policy not in CLASS_BALANCE:
            raise ValueError(f"class_balance must be one of {CLASS_BALANCE}, got {policy!r}")
        self.policy = policy
        counts = np.bincount(y, minlength=n_classes)
        self.present = np.flatnonzero(counts)
        self.order = np.argsort(y, kind="stable")  # image indices grouped by class
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each class starts in ``order``
        self.counts = counts
        self.n = len(y)
        if policy == "weight":
            self.weights = (len(y) / (len(self.present) * counts[y])).astype(np.float32)
        else:
            self.weights = np.ones(len(y), dtype=np.float32)

    def _by_class(self, rng: np.random.Generator, size: int) -> np.ndarray:
        cls = self.present[rng.integers(0, len(self.present), size=size)]
        offset = (rng.random(size) * self.counts[cls]).astype(np.int64)
        return self.order[self.starts[cls] + offset]

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` image indices, with replacement (a batch of steps of the new layer)."""
        if self.policy == "sample":
            return self._by_class(rng, size)
        return rng.integers(0, self.n, size=size)

    def epoch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One epoch, as many draws as images: (image indices (N,), loss weights (N,)).

        ``sample`` draws with replacement by class; the other policies take every image once.
        """
        images = self._by_class(rng, self.n) if self.policy == "sample" else rng.permutation(self.n)
        return images, self.weights[images]
