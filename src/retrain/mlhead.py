"""The multi-label layer: one sigmoid output per label, binary cross entropy, on cached features.

``probs = sigmoid(x @ coef_ + intercept_)``, each label its own logistic regression, trained with
mini-batch steps counted as :class:`retrain.head.SoftmaxHead` counts them (``steps`` of
``batch_size`` images, the same optimizers and weight decay). :func:`fit_sigmoid_layers` trains
several such layers at once (the cross-fit's folds) in one loop; :class:`SigmoidHead` is one of
them with evaluation, logging and best-step selection by validation mAP. The metrics (average
precision, F1 at per-label thresholds, example-based F1) and the per-label threshold choice live
here too, as plain functions of arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from retrain.head import OPTIMIZERS, _Optimizer

MIN_POSITIVES = 5  # held-out positives a label needs for a threshold of its own (else the shared one)
THRESHOLD_RANGE = (0.02, 0.98)  # tuned thresholds are kept inside this, away from 0 and 1


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for any z


def bce(probs: np.ndarray, truth: np.ndarray) -> float:
    """Binary cross entropy summed over labels, averaged over images."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    t = truth.astype(bool)
    return float(-(np.log(np.where(t, p, 1 - p))).sum(axis=1).mean()) if len(p) else 0.0


@dataclass
class MLStep:
    """What an evaluation step reports (the multi-label counterpart of retrain.head.StepReport)."""

    step: int
    cross_entropy: float  # the training batch's, summed over labels
    train_f1: float  # the training batch's example F1 at 0.5
    validation_map: float | None
    validation_cross_entropy: float | None
    validation_count: int


# -- metrics -----------------------------------------------------------------------------------------
def average_precisions(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Average precision per label (L,) of scores ``probs`` (N, L) against ``truth`` (N, L), scikit-learn's
    definition: the sum over distinct thresholds of (R_n - R_{n-1}) P_n; NaN for a label no image has.
    All labels at once (one sort), because the final layer's every evaluation takes it."""
    probs = np.asarray(probs)
    if probs.dtype != np.float32:  # float32 scores are sorted as they are (a cross-fit checkpoint's)
        probs = probs.astype(np.float64)
    truth = np.asarray(truth, bool)
    n = len(probs)
    if n == 0:
        return np.full(truth.shape[1], np.nan)
    order = np.argsort(-probs, axis=0, kind="stable")
    s = np.take_along_axis(probs, order, axis=0)
    tp = np.cumsum(np.take_along_axis(truth, order, axis=0), axis=0, dtype=np.float64)  # (N, L)
    last = np.ones_like(s, bool)  # the last row of each run of equal scores: one threshold
    last[:-1] = s[1:] != s[:-1]
    at_last = np.where(last, tp, 0.0)
    before = np.zeros_like(tp)
    before[1:] = np.maximum.accumulate(at_last, axis=0)[:-1]  # tp at the previous threshold (tp only grows)
    k = np.arange(1, n + 1, dtype=np.float64)[:, None]
    positives = tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(last, (tp - before) * tp / k, 0.0).sum(axis=0) / np.where(
            positives > 0, positives, np.nan
        )


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Average precision of one label; None when no image has the label."""
    ap = float(average_precisions(np.asarray(scores)[:, None], np.asarray(truth)[:, None])[0])
    return None if np.isnan(ap) else ap


def mean_average_precision(probs: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean over the labels that some image has of their average precision (None if no label has one)."""
    aps = average_precisions(probs, truth)
    return float(np.nanmean(aps)) if not np.isnan(aps).all() else None


def example_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over images of the F1 between the predicted and the true label set (both empty: 1)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not len(pred):
        return 0.0
    inter = (pred & truth).sum(axis=1)
    size = pred.sum(axis=1) + truth.sum(axis=1)
    return float(np.where(size == 0, 1.0, 2 * inter / np.maximum(size, 1)).mean())


def multilabel_metrics(
    probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, labels: Sequence[str]
) -> dict:
    """The metrics of a multi-label run on one set of images (metrics.json's ``multi_label`` entries)."""
    truth = np.asarray(truth, bool)
    pred = probs >= np.asarray(thresholds)[None, :]
    per_label = {}
    for j, label in enumerate(labels):
        p, t = pred[:, j], truth[:, j]
        tp, n_pred, n_true = int((p & t).sum()), int(p.sum()), int(t.sum())
        ap = average_precision(probs[:, j], t)
        per_label[label] = {
            "ap": None if ap is None else round(ap, 6),
            "precision": round(tp / n_pred, 6) if n_pred else None,
            "recall": round(tp / n_true, 6) if n_true else None,
            "f1": round(2 * tp / (n_pred + n_true), 6) if n_pred + n_true else None,
            "support": n_true,
            "threshold": round(float(thresholds[j]), 6),
        }
    m = mean_average_precision(probs, truth) if len(truth) else None
    return {
        "mAP": None if m is None else round(m, 6),
        "example_f1": round(example_f1(pred, truth), 6),
        "exact_match": round(float((pred == truth).all(axis=1).mean()), 6) if len(truth) else 0.0,
        "example_f1_at_0.5": round(example_f1(probs >= 0.5, truth), 6),
        "n_images": int(len(truth)),
        "per_label": per_label,
    }


# -- thresholds ----------------------------------------------------------------------------------------
# Thresholds are chosen to maximise what the run reports, example-based F1, on held-out probabilities:
# first one shared threshold for all labels, then each label's own, one label at a time with the others
# fixed, pulled toward the shared one as if the shared one had SHRINK_POSITIVES positives of its own.
# The F1 curves are smoothed first (SMOOTHING, in log-odds): a held-out F1 curve is a staircase of
# single images, and its exact arg-max does not carry over to new photos (docs/multilabel.md, Measured).
MIN_POSITIVES = 5  # held-out positives a label needs for a threshold of its own (else the shared one)
SHRINK_POSITIVES = 30  # weight of the shared threshold, in positives, in a label's own (log-odds average)
SMOOTHING = 0.2  # standard deviation, in log-odds, of the Gaussian the F1 curves are smoothed with
ROUNDS = 2  # passes over the labels (a label's best threshold depends on the others')
THRESHOLD_RANGE = (0.02, 0.98)  # tuned thresholds are kept inside this, away from 0 and 1
_GRID_STEP = 0.05  # candidate thresholds: every 0.05 in log-odds across THRESHOLD_RANGE


def threshold_grid() -> np.ndarray:
    """Candidate thresholds as log-odds, evenly spaced across THRESHOLD_RANGE."""
    lo, hi = _logit(np.array(THRESHOLD_RANGE))
    return np.linspace(lo, hi, int(round((hi - lo) / _GRID_STEP)) + 1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _smooth(curve: np.ndarray) -> np.ndarray:
    """``curve`` (on threshold_grid()) convolved with a Gaussian of SMOOTHING log-odds, edges held."""
    w = SMOOTHING / _GRID_STEP
    half = int(np.ceil(3 * w))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / w) ** 2)
    return np.convolve(np.pad(curve, half, mode="edge"), kernel / kernel.sum(), mode="valid")


def _peak(curve: np.ndarray, grid: np.ndarray, center: float) -> float:
    """The log-odds where the smoothed ``curve`` is highest; on a flat top (scores far apart, so that many
    thresholds are equally good) the point of it nearest ``center``, not one of its ends."""
    c = _smooth(curve)
    top = np.flatnonzero(c >= c.max() - 1e-9)
    return float(grid[top[np.argmin(np.abs(grid[top] - center))]])


def shared_f1_curve(probs: np.ndarray, truth: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Example F1 of ``probs >= sigmoid(z)`` for every label, at each log-odds ``z`` of ``grid`` (ascending).

    In O(N L + N G): a score's bin (how many grid points are at or below it) says at which points it is
    called; per image, the counts of called labels and of called true labels are reversed cumulative
    sums over the bins."""
    z = _logit(np.asarray(probs, np.float64))
    truth = np.asarray(truth, bool)
    n, G = len(z), len(grid)
    bins = np.searchsorted(grid, z, side="right")  # z >= grid[k] exactly for k < bins
    flat = (np.arange(n)[:, None] * (G + 1) + bins).ravel()
    called = np.bincount(flat, minlength=n * (G + 1)).reshape(n, G + 1)
    hits = np.bincount(flat, weights=truth.ravel(), minlength=n * (G + 1)).reshape(n, G + 1)
    called = np.cumsum(called[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (N, G): labels called at grid[k]
    hits = np.cumsum(hits[:, ::-1], axis=1)[:, ::-1][:, 1:]
    size = called + truth.sum(axis=1)[:, None]
    return np.where(size == 0, 1.0, 2 * hits / np.maximum(size, 1)).mean(axis=0)


def label_f1_curve(
    probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, j: int, grid: np.ndarray
) -> np.ndarray:
    """Example F1 at each log-odds of ``grid`` as label ``j``'s threshold, the others at ``thresholds``.

    Exact and O(N log N): an image's F1 changes only by whether label j is called, so the curve is
    the images' F1 without j plus the cumulated change of those whose score is at or above each point."""
    pred = probs >= thresholds[None, :]
    pred[:, j] = False
    inter = (pred & truth).sum(axis=1).astype(np.float64)
    size = (pred.sum(axis=1) + truth.sum(axis=1)).astype(np.float64)
    f_without = np.where(size == 0, 1.0, 2 * inter / np.maximum(size, 1))
    f_with = 2 * (inter + truth[:, j]) / (size + 1)
    z = _logit(np.asarray(probs[:, j], np.float64))
    order = np.argsort(-z, kind="stable")
    gain = np.r_[0.0, np.cumsum((f_with - f_without)[order])]
    called = np.searchsorted(-z[order], -grid, side="right")  # images with z >= each grid point
    return (f_without.sum() + gain[called]) / len(probs)


def tune_thresholds(
    probs: np.ndarray,
    truth: np.ndarray,
    *,
    min_positives: int = MIN_POSITIVES,
    shrink: float = SHRINK_POSITIVES,
) -> tuple[np.ndarray, list[str]]:
    """Per-label thresholds maximising example-based F1 on held-out ``probs`` (N, L) against ``truth``.

    1. shared: the one threshold for every label with the best (smoothed) example F1;
    2. ROUNDS passes over the labels with at least ``min_positives`` held-out positives and one negative:
       the label's best threshold with the others fixed, averaged in log-odds with the shared one,
       weights its positives and ``shrink`` — a label with few positives stays near the shared value;
    3. the other labels keep the shared one.

    Returns (thresholds (L,) float32, per label "tuned" or "shared")."""
    probs = np.asarray(probs, np.float32)
    truth = np.asarray(truth, bool)
    L = truth.shape[1]
    if not truth.any():
        return np.full(L, 0.5, np.float32), ["shared"] * L
    grid = threshold_grid()
    shared = _peak(shared_f1_curve(probs, truth, grid), grid, 0.0)
    z = np.full(L, shared)
    positives = truth.sum(axis=0)
    own = [j for j in range(L) if positives[j] >= min_positives and (~truth[:, j]).any()]
    for _ in range(ROUNDS):
        for j in own:
            best = _peak(label_f1_curve(probs, truth, sigmoid(z), j, grid), grid, shared)
            z[j] = (positives[j] * best + shrink * shared) / (positives[j] + shrink)
    thresholds = np.clip(sigmoid(z), *THRESHOLD_RANGE).astype(np.float32)
    return thresholds, ["tuned" if j in own else "shared" for j in range(L)]


# -- training ------------------------------------------------------------------------------------------
def _check_params(steps, learning_rate, batch_size, optimizer, class_balance) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if class_balance not in ("sample", "weight", "none"):
        raise ValueError(f"class_balance must be sample, weight or none, got {class_balance!r}")
    if steps < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(
            f"steps and batch_size must be >= 1 and learning_rate > 0, got {steps}, {batch_size}"
        )


def positive_weights(Y: np.ndarray, class_balance: str) -> np.ndarray:
    """Loss weight of a label's positives: 1, or with ``class_balance="weight"`` negatives/positives
    (capped at 20), so that a rare label's few photos count as much as its many absences."""
    if class_balance != "weight":
        return np.ones(Y.shape[1], np.float32)
    pos = Y.sum(axis=0).astype(np.float64)
    return np.clip((len(Y) - pos) / np.maximum(pos, 1), 1.0, 20.0).astype(np.float32)


def fit_sigmoid_layers(
    X: np.ndarray,
    Y: np.ndarray,
    jobs: Sequence[tuple[np.ndarray, int]],
    *,
    steps: int,
    learning_rate: float = 0.01,
    batch_size: int = 100,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    class_balance: str = "sample",
    on_step: Callable[[int, np.ndarray], bool | None] | None = None,
    every: Sequence[int] | Callable[[int], bool] = (),
) -> np.ndarray:
    """Train one sigmoid layer per job ``(train_idx, seed)`` on rows of ``X`` (N, D), ``Y`` (N, L) bool.

    The layers share their batches: each step draws rows uniformly from the union of the jobs' rows,
    enough that every job gets ``batch_size`` of its own on average, and each layer learns from those
    of them that are its own (a cross-fit's fold never sees its held-out rows). One gather and two
    matrix products serve all the layers, instead of one of each per layer: the cross-fit's 5 folds
    cost about 2 single fits, not 5 (docs/multilabel.md, Speed). With one job this is plain
    mini-batch training, ``batch_size`` rows a step drawn by the job's seed. The labels of a
    multi-label photo are not one class to balance; ``class_balance="weight"`` weights positives.
    At the steps in ``every`` (or where ``every(step)`` is true) and at the last one,
    ``on_step(step, P)`` sees the parameters P (M, L, D+1) (weights, then the bias column); if it
    returns True, training stops. Returns P.
    """
    _check_params(steps, learning_rate, batch_size, optimizer, class_balance)
    X = np.ascontiguousarray(X, dtype=np.float32)
    Yf = np.asarray(Y, dtype=np.float32)
    M, L, d = len(jobs), Yf.shape[1], X.shape[1]
    rngs = [np.random.default_rng(seed) for _, seed in jobs]
    P = np.zeros((M, L, d + 1), dtype=np.float32)
    pos_w = np.empty((M, L), np.float32)
    for m, ((idx, _), rng) in enumerate(zip(jobs, rngs)):
        if not len(idx):
            raise ValueError("no training images")
        P[m, :, :d] = np.clip(rng.normal(0.0, 0.001, size=(L, d)), -0.002, 0.002)
        prior = np.clip(Yf[idx].mean(axis=0), 1e-3, 1 - 1e-3)
        P[m, :, d] = np.log(prior / (1 - prior))  # start at each label's frequency: fewer steps wasted
        pos_w[m] = positive_weights(Yf[idx], class_balance)
    union = np.unique(np.concatenate([idx for idx, _ in jobs])) if M > 1 else np.asarray(jobs[0][0])
    member = np.zeros((M, len(X)), np.float32)
    for m, (idx, _) in enumerate(jobs):
        member[m, idx] = 1.0
    member = np.ascontiguousarray(member[:, union].T)  # (U, M): row u is in job m's training rows
    share = member.mean(axis=0).min()  # the smallest job's share of the union
    B = batch_size if M == 1 else int(np.ceil(batch_size / share))
    marks = set(every) if not callable(every) else None
    moments = (np.zeros_like(P), np.zeros_like(P))
    update = _Optimizer(optimizer, P, moments, learning_rate, weight_decay, d)
    W = P[:, :, :d].reshape(M * L, d)  # a view: the weights of every layer, one row per (layer, label)
    gP = np.empty_like(P)
    gW = gP[:, :, :d].reshape(M * L, d)
    xb = np.empty((B, d), np.float32)
    yb = np.empty((B, L), np.float32)
    with threadpool_limits(1, user_api="blas"):
        for step in range(1, steps + 1):
            pick = rngs[0].integers(0, len(union), size=B)
            np.take(X, union[pick], axis=0, out=xb)
            np.take(Yf, union[pick], axis=0, out=yb)
            own = member[pick]  # (B, M)
            z = (xb @ W.T).reshape(B, M, L)
            z += P[:, :, d]
            # d(BCE)/dz = p - y, positives weighted: w_pos * (p - 1) for y = 1; each layer averages its own rows.
            g = sigmoid(z)
            g -= yb[:, None, :]
            if class_balance == "weight":
                g *= 1 + (pos_w[None, :, :] - 1) * yb[:, None, :]
            g *= (own / np.maximum(own.sum(axis=0), 1.0))[:, :, None]
            g2 = g.reshape(B, M * L)
            np.matmul(g2.T, xb, out=gW)
            g.sum(axis=0, out=gP[:, :, d])
            update(gP, step)
            due = step == steps or (step in marks if marks is not None else every(step))
            if due and on_step is not None and on_step(step, P):
                break
    return P


class SigmoidHead:
    """One sigmoid output per label, fitted by mini-batch steps; keeps the weights of the step with the
    best validation mAP (ties: lower cross entropy) when validation rows are given."""

    def __init__(
        self,
        *,
        steps: int = 4000,
        learning_rate: float = 0.01,
        batch_size: int = 100,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        class_balance: str = "sample",
        keep_best: bool = True,
        seed: int | None = None,
    ):
        _check_params(steps, learning_rate, batch_size, optimizer, class_balance)
        self.steps, self.learning_rate, self.batch_size = steps, learning_rate, batch_size
        self.optimizer, self.weight_decay, self.class_balance = optimizer, weight_decay, class_balance
        self.keep_best, self.seed = keep_best, seed

    def params(self) -> dict:
        return dict(
            steps=self.steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            class_balance=self.class_balance,
        )

    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        *,
        X_val: np.ndarray | None = None,
        Y_val: np.ndarray | None = None,
        eval_every: int = 10,
        on_eval: Callable[[MLStep, SigmoidHead], None] | None = None,
    ) -> SigmoidHead:
        X = np.ascontiguousarray(X, np.float32)
        Y = np.asarray(Y, bool)
        if not len(X):
            raise ValueError("no training images")
        d = X.shape[1]
        self.n_features_in_, self.n_labels_ = d, Y.shape[1]
        has_val = X_val is not None and len(X_val) > 0
        best = {"score": (-np.inf, -np.inf), "P": None, "step": self.steps}
        batch_rng = np.random.default_rng(None if self.seed is None else self.seed + 7)

        def on_step(step: int, P: np.ndarray) -> None:
            W, b = P[0, :, :d].T, P[0, :, d]
            self.coef_, self.intercept_ = W, b
            rows = batch_rng.integers(0, len(X), size=min(len(X), self.batch_size))
            pb = sigmoid(X[rows] @ W + b)
            val_map = val_xent = None
            if has_val:
                pv = sigmoid(X_val @ W + b)
                val_map = mean_average_precision(pv, Y_val)
                val_xent = bce(pv, Y_val)
                score = (val_map if val_map is not None else 0.0, -val_xent)
                if score > best["score"]:
                    best.update(score=score, P=P[0].copy(), step=step)
            report = MLStep(
                step,
                bce(pb, Y[rows]),
                example_f1(pb >= 0.5, Y[rows]),
                val_map,
                val_xent,
                len(X_val) if has_val else 0,
            )
            if on_eval is not None:
                on_eval(report, self)

        every = max(1, eval_every)
        P = fit_sigmoid_layers(
            X,
            Y,
            [(np.arange(len(X)), self.seed if self.seed is not None else 0)],
            every=lambda s: s % every == 0,
            on_step=on_step,
            **self.params(),
        )
        use_best = self.keep_best and has_val and best["P"] is not None
        final = best["P"] if use_best else P[0].copy()
        self.best_step_ = best["step"] if use_best else self.steps
        self.coef_, self.intercept_ = final[:, :d].T.copy(), final[:, d].copy()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this SigmoidHead is not fitted yet; call fit(X, Y) first")
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has shape {X.shape}, but this head expects (N, {self.n_features_in_}) features"
            )
        return sigmoid(X @ self.coef_ + self.intercept_).astype(np.float32)
