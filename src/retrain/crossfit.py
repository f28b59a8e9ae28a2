"""Out-of-fold fits of the new layer on cached features: one mechanism, several uses.

Every image gets class scores from a layer that never saw it. The same predictions serve
choosing the number of steps before the final layer is fitted on every labelled image,
calibration, the unknown threshold, finding mislabelled photos and the learning curve, so
they are computed once, here, and handed to each of those as plain arrays.

A fold fit is an ordinary :class:`~retrain.head.SoftmaxHead` fit (the same steps, optimizer and
class balance as the final layer), scored on its held-out rows at a handful of step counts.
Rows that share a group (identical content, ``_nohash_`` names) always share a fold, so a
copy of an image can never vouch for itself.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from retrain.features import cpu_cores
from retrain.head import SoftmaxHead, softmax

DEFAULT_FOLDS = 5
CHECKPOINTS = 20  # step counts scored per fold fit (evenly spaced up to the full count)


@dataclass
class CrossFit:
    """Out-of-fold predictions for N rows and C classes.

    ``logits`` (N, C) are those of the layer that did not see the row, after ``best_steps`` steps;
    ``proba`` is their softmax. ``fold`` (N,) names the fold each row was held out in.
    ``curve_steps`` (S,) are the step counts scored; ``curve_accuracy`` and ``curve_loss`` (S,)
    the out-of-fold accuracy and mean cross entropy at each.
    """

    logits: np.ndarray
    fold: np.ndarray
    curve_steps: np.ndarray
    curve_accuracy: np.ndarray
    curve_loss: np.ndarray
    best_steps: int
    seconds: float

    @property
    def proba(self) -> np.ndarray:
        return softmax(self.logits.copy())

    @property
    def accuracy(self) -> float:
        """Out-of-fold accuracy at ``best_steps``."""
        return float(self.curve_accuracy[list(self.curve_steps).index(self.best_steps)])


def group_ids(groups: Sequence[Hashable] | None, n: int) -> np.ndarray:
    """Dense integer ids (N,) for ``groups`` (any hashables); every row its own group when None."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} rows")
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)


def assign_folds(
    y: np.ndarray, k: int, *, groups: Sequence[Hashable] | None = None, seed: int = 0
) -> np.ndarray:
    """A fold in [0, k) for every row: stratified by class, groups kept whole, deterministic for ``seed``.

    Each class's groups are shuffled and dealt round the folds, starting where the previous
    class stopped, so fold sizes stay within one group of each other per class and overall.
    """
    y = np.asarray(y)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    gid = group_ids(groups, len(y))
    rng = np.random.default_rng(seed)
    # A group's class is that of its first row (a group holding several classes is a labelling conflict
    # that the duplicate report names; for folds it only has to go somewhere).
    first = np.unique(gid, return_index=True)[1]
    group_class = y[first]
    fold_of_group = np.empty(len(first), dtype=np.int64)
    start = 0
    for c in np.unique(group_class):
        members = rng.permutation(np.flatnonzero(group_class == c))
        fold_of_group[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return fold_of_group[gid]


def checkpoint_steps(steps: int, count: int = CHECKPOINTS) -> np.ndarray:
    """``count`` evenly spaced step counts ending at ``steps`` (fewer when ``steps`` is small)."""
    every = max(1, steps // count)
    marks = list(range(every, steps + 1, every))
    if marks[-1] != steps:
        marks.append(steps)
    return np.array(marks, dtype=np.int64)


def fit_and_score(
    X: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    score_idx: np.ndarray,
    *,
    n_classes: int,
    head_params: dict,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit one layer on ``train_idx`` rows and score ``score_idx`` rows as it trains.

    Returns (step counts (S,), logits (S, len(score_idx), C)) at the steps of :func:`checkpoint_steps`.
    ``head_params`` are :class:`SoftmaxHead` keyword arguments (``steps`` included).
    """
    params = {**head_params, "seed": seed, "keep_best": False}
    head = SoftmaxHead(**params)
    marks = checkpoint_steps(head.steps)
    every = int(marks[0])
    X_score = X[score_idx]  # (M, D)
    out = np.empty((len(marks), len(score_idx), n_classes), dtype=np.float32)
    taken: list[int] = []

    def record(report, fitted: SoftmaxHead) -> None:
        if report.step in marks[len(taken) :]:
            i = len(taken)
            out[i] = X_score @ fitted.coef_ + fitted.intercept_
            taken.append(report.step)

    head.fit(X[train_idx], y[train_idx], n_classes=n_classes, eval_every=every, on_eval=record)
    return marks, out


def cross_fit(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    head_params: dict,
    folds: int = DEFAULT_FOLDS,
    groups: Sequence[Hashable] | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> CrossFit:
    """Out-of-fold logits for every row of ``X`` (N, D) with labels ``y`` (N,).

    ``folds`` layers are fitted, each on all rows but one fold, with ``head_params`` (keyword
    arguments of :class:`SoftmaxHead`); the step count with the best out-of-fold accuracy (ties:
    lower cross entropy, then fewer steps) is ``best_steps``, and ``logits`` are taken there.
    With fewer rows than folds, the number of folds drops to the number of rows.
    """
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n < 2:
        raise ValueError(f"cross-fitting needs at least 2 rows, got {n}")
    k = min(folds, len(np.unique(group_ids(groups, n))))
    if k < 2:
        raise ValueError("cross-fitting needs at least 2 distinct groups")
    fold = assign_folds(y, k, groups=groups, seed=seed)
    jobs = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f), seed + 1000 * (f + 1)) for f in range(k)]

    def run(job):
        train_idx, score_idx, fold_seed = job
        return fit_and_score(
            X, y, train_idx, score_idx, n_classes=n_classes, head_params=head_params, seed=fold_seed
        )

    with ThreadPoolExecutor(max_workers=workers or min(k, cpu_cores())) as pool:
        results = list(pool.map(run, jobs))
    marks = results[0][0]
    logits = np.empty((len(marks), n, n_classes), dtype=np.float32)  # (S, N, C)
    for (_, score_idx, _), (_, scored) in zip(jobs, results):
        logits[:, score_idx] = scored
    accuracy = (logits.argmax(axis=2) == y).mean(axis=1)  # (S,)
    loss = np.array([_mean_cross_entropy(z, y) for z in logits])
    best = max(range(len(marks)), key=lambda i: (accuracy[i], -loss[i], -marks[i]))
    return CrossFit(
        logits=logits[best],
        fold=fold,
        curve_steps=marks,
        curve_accuracy=accuracy,
        curve_loss=loss,
        best_steps=int(marks[best]),
        seconds=time.perf_counter() - t0,
    )


def _mean_cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())
