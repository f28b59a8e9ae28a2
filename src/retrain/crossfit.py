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

import os
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from retrain.head import SoftmaxHead, _Optimizer, softmax
from retrain.logreg import class_weights, fit_logistic, strength
from retrain.sampling import ClassBalancedSampler

DEFAULT_FOLDS = 5
# scikit-learn's C (1 / (l2 * n)) values the L2 path scores, strongest regularisation first: the grid of
# the LogisticRegressionCV that docs/benchmarks.md compares with.
C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 11))
CHECKPOINTS = 20  # step counts scored per fold fit (spaced geometrically up to the full count)
# Cross-fitting stops after PATIENCE checkpoints in a row without a better out-of-fold score, where "better"
# means an accuracy higher by more than TOLERANCE. On the real photo sets of docs/benchmarks.md the chosen
# point's test accuracy was the same with 6 checkpoints of patience and no tolerance, which ran every fit
# 1.27^6 = 4.3x past its best (on digits, to the full 4,000 steps for a last 0.3 points out of fold).
PATIENCE = 3
TOLERANCE = 0.002  # out-of-fold accuracy (0.2 points: under one image below 500 rows, 3 images at 1,300)
# The L2 path (cross_fit_l2) chooses C by the out-of-fold cross entropy, which is smooth and U-shaped in C: a
# value counts as better when it lowers the best so far by more than L2_TOLERANCE (relative), and the path stops
# L2_PATIENCE values after the last better one, but never before some value has beaten the first: at the strong
# end the loss can sit on a plateau near log(classes) (small features, where C = 0.001 is very strong), which a
# relative test alone would mistake for the bottom. Chosen by accuracy (the step solver's rule, until 2026-12-03)
# the layer was 0.3-1.0 points less accurate on four of the five photo sets of docs/benchmarks.md and level on
# the fifth: the accuracy curve is flat over a decade or two of C, so that choice is mostly noise. A 2% step
# stops before the weak end, whose solves are the slowest, where the loss only loses its last percent
# (benchmarks/l2_rules.py: as accurate as 0.1%, fewer values walked).
L2_TOLERANCE = 0.02
L2_PATIENCE = 2
# The bias a warm start gives a class that has no rows in a refit (a leave-one-class-out layer): e^-30 of the
# probability, so its gradient is nil from the start.
ABSENT_BIAS = -30.0


@dataclass
class CrossFit:
    """Out-of-fold predictions for N rows and C classes.

    ``logits`` (N, C) are those of the layer that did not see the row, after ``best_steps`` steps;
    ``proba`` is their softmax. ``fold`` (N,) names the fold each row was held out in.
    ``curve_steps`` (S,) are the step counts scored; ``curve_accuracy`` and ``curve_loss`` (S,)
    the out-of-fold accuracy and mean cross entropy at each, at the chosen ``weight_decay``.
    """

    logits: np.ndarray
    fold: np.ndarray
    curve_steps: np.ndarray
    curve_accuracy: np.ndarray
    curve_loss: np.ndarray
    best_steps: int
    seconds: float
    weight_decay: float = 0.0  # the L2 strength the logits (and the final layer) were fitted with
    decay_accuracy: dict[float, float] = field(default_factory=dict)  # each decay tried: its best accuracy
    # The L2 path (cross_fit_l2): the scikit-learn C values scored, in order, and the one chosen. The curve
    # arrays then follow curve_c, curve_steps is empty and best_steps 0.
    curve_c: np.ndarray | None = None
    c: float | None = None

    @property
    def proba(self) -> np.ndarray:
        return softmax(self.logits.copy())

    @property
    def accuracy(self) -> float:
        """Out-of-fold accuracy at the chosen point (``best_steps``, or ``c`` on the L2 path)."""
        if self.c is not None:
            return float(self.curve_accuracy[list(self.curve_c).index(self.c)])
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
    """Up to ``count`` step counts from ``steps / 100`` to ``steps``, spaced geometrically.

    Geometric, because a layer on good features often peaks within the first few hundred steps
    and then only grows more confident; even spacing would never look there.
    """
    marks = np.unique(np.round(np.geomspace(max(1.0, steps / 100), steps, count)).astype(np.int64))
    return marks


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
    marks, (scored,) = fit_and_score_many(
        X, y, [(train_idx, score_idx, seed)], n_classes=n_classes, head_params=head_params
    )
    return marks, scored


def fit_and_score_many(
    X: np.ndarray,
    y: np.ndarray,
    jobs: Sequence[tuple[np.ndarray, np.ndarray, int]],
    *,
    n_classes: int,
    head_params: dict,
    stop: Callable[[list[np.ndarray], int], bool] | None = None,
    weight_decays: Sequence[float] | None = None,
    score_at: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fit one layer per job ``(train_idx, score_idx, seed)``, all in one loop, and score each job's rows.

    Each layer follows :class:`SoftmaxHead`'s algorithm (initialisation, ``class_balance`` draws,
    optimizer, weight decay, steps of ``batch_size``); stacking them turns M layers' small matrix
    products into one batched product per step, so M fits cost little more than one.
    Returns (step counts (S,), per job logits (S, len(score_idx), C)). After each checkpoint ``i``,
    ``stop(outputs, i)`` may end all fits early; the arrays returned then end at that checkpoint.
    ``score_at`` replaces the step counts of :func:`checkpoint_steps` (e.g. ``[steps]``: only the end).

    ``weight_decays`` (G values; default: ``head_params``' one) fits every job once per value, on the
    same batches (the same seed draws the same images), and returns G x M outputs, value-major:
    output ``g * M + m`` is job ``m`` at ``weight_decays[g]``. The batches are gathered once for all G.
    """
    head = SoftmaxHead(**{**head_params, "keep_best": False})  # validates the parameters
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    marks = checkpoint_steps(head.steps)
    if score_at is not None:
        marks = np.unique(np.clip(np.asarray(score_at, dtype=np.int64), 1, head.steps))
    decays = np.array([head.weight_decay] if weight_decays is None else weight_decays, dtype=np.float32)
    G, M, C, d = len(decays), len(jobs), n_classes, X.shape[1]
    rngs = [np.random.default_rng(seed) for _, _, seed in jobs]
    samplers = [ClassBalancedSampler(y[train_idx], C, head.class_balance) for train_idx, _, _ in jobs]
    # Per layer: class weights, then the bias column; layer (g, m) is job m at weight decay g.
    P = np.zeros((G, M, C, d + 1), dtype=np.float32)
    for m, rng in enumerate(rngs):
        P[:, m, :, :d] = np.clip(rng.normal(0.0, 0.001, size=(d, C)), -0.002, 0.002).T
    moments = (np.zeros_like(P), np.zeros_like(P))
    decay = decays[:, None, None, None] if np.any(decays != decays[0]) else float(decays[0])
    outputs = [
        np.empty((len(marks), len(score_idx), C), dtype=np.float32)
        for _ in range(G)
        for _, score_idx, _ in jobs
    ]
    # The layers are independent, so blocks of them step on separate threads (NumPy and single-threaded BLAS
    # release the GIL): every layer does exactly the arithmetic it would do alone, whatever the thread count.
    parts = np.array_split(np.arange(M), _fit_threads(M, len(X) * d))
    blocks = [
        _LayerBlock(
            X,
            y,
            [jobs[m] for m in part],
            [samplers[m] for m in part],
            [rngs[m] for m in part],
            P[:, part[0] : part[-1] + 1],
            tuple(x[:, part[0] : part[-1] + 1] for x in moments),
            head,
            decay,
        )
        for part in parts
    ]
    step, mark = 0, 0
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(blocks)) as pool:
        while step < head.steps:
            until = int(marks[mark]) if mark < len(marks) else head.steps
            list(pool.map(_LayerBlock.run, blocks, [step] * len(blocks), [until] * len(blocks)))  # re-raises
            step = until
            if mark < len(marks) and step == marks[mark]:
                for (_, score_idx, _), out, Pm in zip(jobs * G, outputs, P.reshape(G * M, C, d + 1)):
                    out[mark] = X[score_idx] @ Pm[:, :d].T + Pm[:, d]
                mark += 1
                if stop is not None and mark < len(marks) and stop(outputs, mark - 1):
                    break
    return marks[:mark], [out[:mark] for out in outputs]


def _fit_threads(layers: int, work: int) -> int:
    """Threads for ``layers`` fold fits on ``work`` (rows x features) values: two when two cores are free
    to this process and the fits are big enough for a thread's start to be noise (digits: 1,600 x 1,280)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cores >= 2 and layers >= 2 and work >= 50_000 else 1


class _LayerBlock:
    """Some of :func:`fit_and_score_many`'s layers (jobs x weight decays), stepped together.

    ``P`` and ``moments`` are views of the caller's arrays (G, M_block, C, D+1), updated in place. Each step
    draws every job's batch (its own sampler and generator), gathers them once for all G decays, and takes
    one optimizer step; the batch-major logits (B, C) = batch @ weights.T are a third faster than
    (C, B) = weights @ batch.T, whose strided batch operand OpenBLAS copies every step.
    """

    def __init__(self, X, y, jobs, samplers, rngs, P, moments, head: SoftmaxHead, decay):
        G, M, C, d1 = P.shape
        d, B = d1 - 1, head.batch_size
        self.X, self.y, self.jobs, self.samplers, self.rngs, self.P = X, y, jobs, samplers, rngs, P
        self.update = _Optimizer(head.optimizer, P, moments, head.learning_rate, decay, d)
        self.eye = np.eye(C, dtype=np.float32)
        self.xb = np.empty((M, B, d), dtype=np.float32)  # each layer's batch
        self.yb, self.wb = np.empty((M, B), dtype=np.int64), np.empty((M, B), dtype=np.float32)
        self.rows = np.empty((M, B), dtype=np.int64)  # the rows of X in each layer's batch
        self.z = np.empty((G, M, B, C), dtype=np.float32)  # logits, probabilities, then their gradient
        self.gP = np.empty_like(P)
        self.weights_t, self.bias = P[..., :d].transpose(0, 1, 3, 2), P[..., d][..., None, :]  # views
        self.B, self.d = B, d

    def run(self, step: int, until: int) -> None:
        """Steps ``step + 1`` to ``until`` (1-based, for Adam's bias correction)."""
        X, xb, yb, wb, rows, z, gP, d = self.X, self.xb, self.yb, self.wb, self.rows, self.z, self.gP, self.d
        for t in range(step + 1, until + 1):
            for m, ((train_idx, _, _), sampler, rng) in enumerate(zip(self.jobs, self.samplers, self.rngs)):
                local = sampler.draw(rng, self.B)  # (B,) rows of this layer's training subset
                rows[m], wb[m] = train_idx[local], sampler.weights[local]
            np.take(X, rows.reshape(-1), axis=0, out=xb.reshape(-1, d))  # one gather for all layers
            np.take(self.y, rows, out=yb)
            np.matmul(xb, self.weights_t, out=z)  # (G, M, B, C)
            z += self.bias
            z -= z.max(axis=3, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=3, keepdims=True)  # softmax over classes
            z -= self.eye[yb]
            z *= (wb / wb.sum(axis=1, keepdims=True))[..., None]  # the gradient wrt the logits
            np.matmul(z.transpose(0, 1, 3, 2), xb, out=gP[..., :d])
            z.sum(axis=2, out=gP[..., d])
            self.update(gP, t)


def cross_fit(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    head_params: dict,
    folds: int = DEFAULT_FOLDS,
    groups: Sequence[Hashable] | None = None,
    seed: int = 0,
    patience: int = PATIENCE,
    tolerance: float = TOLERANCE,
    weight_decays: Sequence[float] | None = None,
) -> CrossFit:
    """Out-of-fold logits for every row of ``X`` (N, D) with labels ``y`` (N,).

    ``folds`` layers are fitted, each on all rows but one fold, with ``head_params`` (keyword
    arguments of :class:`SoftmaxHead`), once per value of ``weight_decays`` (default: only
    ``head_params``' own), all in one batched loop on the same batches. The (weight decay, step count)
    with the best out-of-fold accuracy is ``(weight_decay, best_steps)``, and ``logits`` are taken there;
    a point counts as better only with an accuracy more than ``tolerance`` higher than the best before it
    (of equals, the fewest steps and then the least decay). The fits stop once ``patience`` checkpoints in
    a row brought no better point at any weight decay. With fewer groups than folds,
    the number of folds drops to the number of groups.
    """
    t0 = time.perf_counter()
    X, y, fold, k = _prepare(X, y, folds, groups, seed)
    n = len(y)
    decays = [float(head_params.get("weight_decay", 0.0))] if weight_decays is None else sorted(weight_decays)
    jobs = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f), seed + 1000 * (f + 1)) for f in range(k)]
    S, G = len(checkpoint_steps(head_params.get("steps", 4000))), len(decays)
    logits = np.empty((G, S, n, n_classes), np.float32)
    scores: list[list[tuple[float, float]]] = [[] for _ in decays]  # per decay, per checkpoint

    def best_point() -> tuple[int, int]:
        """(decay index, checkpoint) of the best accuracy, in checkpoint order: a later point (or a larger
        decay at the same checkpoint) wins only with an accuracy more than ``tolerance`` higher, so of
        equals the first (fewer steps, less decay) stays. No tie-break by cross entropy: once out-of-fold
        accuracy is saturated the loss keeps falling as the layer grows more confident, and following it
        ran easy sets to the full step count for nothing that the test accuracy showed."""
        best, best_accuracy = (0, 0), scores[0][0][0]
        for i in range(len(scores[0])):
            for g in range(G):
                if scores[g][i][0] > best_accuracy + tolerance:
                    best, best_accuracy = (g, i), scores[g][i][0]
        return best

    def score(outputs: list[np.ndarray], i: int) -> bool:
        for g in range(G):
            for (_, score_idx, _), out in zip(jobs, outputs[g * k : (g + 1) * k]):
                logits[g, i, score_idx] = out[i]
            accuracy = float((logits[g, i].argmax(axis=1) == y).mean())
            scores[g].append((accuracy, -_mean_cross_entropy(logits[g, i], y)))
        return i - best_point()[1] >= patience

    marks, scored = fit_and_score_many(
        X, y, jobs, n_classes=n_classes, head_params=head_params, stop=score, weight_decays=decays
    )
    if len(scores[0]) < len(marks):  # the last checkpoint is not offered to stop()
        score(scored, len(marks) - 1)
    g, best = best_point()
    return CrossFit(
        logits=logits[g, best].copy(),
        fold=fold,
        curve_steps=marks,
        curve_accuracy=np.array([a for a, _ in scores[g]]),
        curve_loss=np.array([-nl for _, nl in scores[g]]),
        best_steps=int(marks[best]),
        seconds=time.perf_counter() - t0,
        weight_decay=decays[g],
        decay_accuracy={d: max(a for a, _ in scores[j]) for j, d in enumerate(decays)},
    )


def _prepare(X, y, folds: int, groups, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(X float32, y int64, the fold of each row, the number of folds): fewer folds than asked when there are
    fewer groups; a ValueError when there is nothing to cross-fit."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n < 2:
        raise ValueError(f"cross-fitting needs at least 2 rows, got {n}")
    k = min(folds, len(np.unique(group_ids(groups, n))))
    if k < 2:
        raise ValueError("cross-fitting needs at least 2 distinct groups")
    return X, y, assign_folds(y, k, groups=groups, seed=seed), k


def _mean_cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def cross_fit_l2(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    folds: int = DEFAULT_FOLDS,
    groups: Sequence[Hashable] | None = None,
    seed: int = 0,
    cs: Sequence[float] = C_GRID,
    balanced: bool = False,
    patience: int = L2_PATIENCE,
    tolerance: float = L2_TOLERANCE,
) -> CrossFit:
    """Out-of-fold logits of L2-regularised logistic layers (:mod:`retrain.logreg`), C chosen on a path.

    The same folds as :func:`cross_fit`. Each fold's layer is solved at every C of ``cs`` in turn, strongest
    regularisation first, each solution warm-starting the next (the weak end converges slowly: it is
    reached only while it pays). A C counts as better only with an out-of-fold mean cross entropy lower than
    the best before it by more than the fraction ``tolerance``, so of equals the stronger regularisation
    stays, and the path stops ``patience`` values after the last better one (once one has beaten the first).
    ``weight_decay`` of the result is the chosen C's strength for all ``N`` rows, i.e. what the final layer on
    every row is fitted with.
    """
    t0 = time.perf_counter()
    X, y, fold, k = _prepare(X, y, folds, groups, seed)
    n = len(y)
    parts = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]
    weights = class_weights(y, n_classes) if balanced else None
    solutions: list[tuple[np.ndarray, np.ndarray] | None] = [None] * k
    # Two (N, C) buffers, not one per C (at a million images of 100 classes each is 400 MB): the best C's
    # logits so far, and the one the current C writes.
    buffers = (np.empty((n, n_classes), np.float32), np.empty((n, n_classes), np.float32))
    current = held = 0
    accuracy: list[float] = []
    loss: list[float] = []
    best = 0

    def solve(f: int, c: float) -> None:
        train_idx, score_idx = parts[f]
        W, b, _ = fit_logistic(
            X[train_idx],
            y[train_idx],
            n_classes=n_classes,
            l2=strength(c, len(train_idx)),
            sample_weight=None if weights is None else weights[train_idx],
            init=solutions[f],
        )
        solutions[f] = (W, b)
        buffers[current][score_idx] = X[score_idx] @ W + b

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(_fit_threads(k, n * X.shape[1])) as pool:
        for i, c in enumerate(cs):
            list(pool.map(solve, range(k), [c] * k))  # re-raises
            accuracy.append(float((buffers[current].argmax(axis=1) == y).mean()))
            loss.append(_mean_cross_entropy(buffers[current], y))
            if i == 0 or loss[i] < loss[best] * (1 - tolerance):
                best, held, current = i, current, 1 - current
            if best > 0 and i - best >= patience:
                break
    scored = np.asarray(cs[: len(accuracy)], dtype=np.float64)
    return CrossFit(
        logits=buffers[held],
        fold=fold,
        curve_steps=np.zeros(0, dtype=np.int64),
        curve_accuracy=np.array(accuracy),
        curve_loss=np.array(loss),
        best_steps=0,
        seconds=time.perf_counter() - t0,
        weight_decay=strength(float(scored[best]), n),
        curve_c=scored,
        c=float(scored[best]),
    )


def solve_and_score_chains(
    X: np.ndarray,
    y: np.ndarray,
    chains: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
    *,
    n_classes: int,
    c: float,
    balanced: bool = False,
    inits: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> list[list[np.ndarray]]:
    """The L-BFGS layer at scikit-learn's ``c`` solved on each job's rows and scored on its score rows.

    ``chains``: lists of jobs (train_idx, score_idx); the jobs of one chain are solved in order, each
    warm-starting from the one before (nested subsets of a learning curve), from ``inits[i]`` for chain
    i's first (None: from zero). Chains run in two threads when two cores are free. Returns per chain, per
    job, the logits (len(score_idx), n_classes). A class without rows in a job keeps a very negative bias
    (its column is never a target there) instead of drifting towards minus infinity.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    inits = list(inits) if inits is not None else [None] * len(chains)

    def run(i: int) -> list[np.ndarray]:
        out, init = [], inits[i]
        for train_idx, score_idx in chains[i]:
            yt = y[train_idx]
            absent = np.bincount(yt, minlength=n_classes) == 0
            if absent.any():
                init = _set_aside(init, absent, X.shape[1])
            W, b, _ = fit_logistic(
                X[train_idx],
                yt,
                n_classes=n_classes,
                l2=strength(c, len(train_idx)),
                sample_weight=class_weights(yt, n_classes) if balanced else None,
                init=init,
            )
            init = (W, b)
            out.append(X[score_idx] @ W + b)
        return out

    work = sum(len(t) for chain in chains for t, _ in chain) * X.shape[1]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(_fit_threads(len(chains), work)) as pool:
        return list(pool.map(run, range(len(chains))))


def _set_aside(init, absent: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """A warm start (W (D, C), b (C,)) -- ``init``, or zeros -- whose ``absent`` classes' columns are zero and
    biases ABSENT_BIAS."""
    W = np.zeros((d, len(absent)), np.float32) if init is None else np.array(init[0], np.float32)
    b = np.zeros(len(absent), np.float32) if init is None else np.array(init[1], np.float32)
    W[:, absent], b[absent] = 0.0, ABSENT_BIAS
    return W, b
