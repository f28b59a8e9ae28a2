"""Calibrated probabilities: one temperature for the logits, and the expected calibration error.

Temperature scaling divides the logits by a single T > 0 chosen to minimise the cross entropy
of held-out predictions (out-of-fold logits, or the validation split). Dividing by a positive
number never changes which class is largest, so accuracy is untouched; only the confidence
moves. The exported graph carries T folded into the new layer's weights (``coef / T``,
``intercept / T``), so inference costs nothing extra.

A multi-label head would get one temperature per label (each a binary problem); the
manifest entry is a dict with ``"method"`` so that case can be added beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
T_MIN, T_MAX = 0.05, 20.0  # search range
PRIOR_SD = 0.5  # log T ~ N(0, 0.5^2): a few held-out rows (all right, say) cannot push T to an extreme


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t  # (N, C)
    z = z - z.max(axis=1, keepdims=True)
    return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the cross entropy of ``softmax(logits / T)`` for labels ``y``,
    with a weak prior that keeps T near 1 unless the rows say otherwise (MAP: total NLL +
    (log T)^2 / (2 * 0.5^2); negligible for hundreds of rows, decisive for ten).

    A golden-section search on log T finds the minimum; 1.0 when there are no rows.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    n = len(y)
    # max(z / T) = max(z) / T for T > 0: shift once, not at every one of the ~40 evaluations.
    zc = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    zy = zc[np.arange(n), y].mean()

    def loss(log_t: float) -> float:
        inv = np.exp(-log_t)
        nll = np.log(np.exp(zc * inv).sum(axis=1)).mean() - zy * inv
        return float(nll) + log_t**2 / (2 * PRIOR_SD**2 * n)

    lo, hi = np.log(T_MIN), np.log(T_MAX)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(40):  # the bracket shrinks to 0.618^40 of log(400), 1.5e-8: far below any T that matters
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


@dataclass
class Reliability:
    """Top-1 reliability in ``ECE_BINS`` equal-width confidence bins.

    ``edges`` (B+1,); per bin (B,): ``count``, mean ``confidence`` and ``accuracy`` (NaN -> None in JSON
    for empty bins). ``ece`` is the count-weighted mean of |accuracy - confidence|.
    """

    ece: float
    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def to_dict(self) -> dict:
        def listed(a):
            return [None if np.isnan(v) else round(float(v), 6) for v in a]

        return {
            "ece": round(self.ece, 6),
            "bins": len(self.count),
            "edges": [round(float(e), 6) for e in self.edges],
            "count": [int(c) for c in self.count],
            "confidence": listed(self.confidence),
            "accuracy": listed(self.accuracy),
        }


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Expected calibration error of the top-1 score, with the per-bin numbers a diagram needs."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    if len(y) == 0:
        nan = np.full(bins, np.nan)
        return Reliability(float("nan"), edges, np.zeros(bins, np.int64), nan, nan.copy())
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 (impossible for a softmax) goes in bin 0.
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, bins) / count
        accuracy = np.bincount(which, correct, bins) / count
    gap = np.where(count > 0, np.abs(accuracy - mean_conf), 0.0)
    return Reliability(float((count * gap).sum() / len(y)), edges, count, mean_conf, accuracy)


@dataclass
class Calibration:
    """A fitted temperature and the reliability before/after it on each set it was measured on."""

    temperature: float
    fitted_on: str  # which rows chose T, e.g. "out-of-fold train+validation"
    fitted_count: int
    before: dict[str, Reliability]
    after: dict[str, Reliability]

    def manifest(self) -> dict:
        return {"method": "temperature", "temperature": self.temperature, "fitted_on": self.fitted_on}

    def to_dict(self) -> dict:
        return {
            **self.manifest(),
            "fitted_count": self.fitted_count,
            "ece_before": {k: round(v.ece, 6) for k, v in self.before.items()},
            "ece_after": {k: round(v.ece, 6) for k, v in self.after.items()},
            "reliability": {
                k: {"before": self.before[k].to_dict(), "after": self.after[k].to_dict()} for k in self.before
            },
        }


def calibrate(
    fit_logits: np.ndarray,
    fit_y: np.ndarray,
    *,
    fitted_on: str,
    measure: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    enabled: bool = True,
) -> Calibration:
    """Fit T on ``fit_logits`` (N, C) / ``fit_y`` and measure ECE before and after on ``fitted_on`` and
    on each ``measure`` entry (name -> (logits, labels)). ``enabled=False`` keeps T = 1 but still measures.

    A temperature is used only if it carries over to rows it was not fitted on (:func:`carries_over`):
    on few held-out rows, or rows whose confidence differs from part to part, the T that minimises their
    cross entropy can sharpen or soften past calibration.
    """
    t = fit_temperature(fit_logits, fit_y) if enabled else 1.0
    if t != 1.0 and not carries_over(fit_logits, fit_y):
        t = 1.0
    sets = {fitted_on: (fit_logits, fit_y), **(measure or {})}
    sets = {name: (z, y) for name, (z, y) in sets.items() if len(y)}
    before = {name: reliability(softmax(z), y) for name, (z, y) in sets.items()}
    after = {name: reliability(softmax(z, t), y) for name, (z, y) in sets.items()}
    return Calibration(t, fitted_on, len(fit_y), before, after)


GUARD_FOLDS = 5


def carries_over(logits: np.ndarray, y: np.ndarray, folds: int = GUARD_FOLDS) -> bool:
    """Whether temperatures fitted on the other folds of the held-out rows lower the cross entropy of each
    fold's rows (summed over folds) below that of T = 1: the temperature's own held-out test.

    Cross entropy, not ECE: a proper score, and far less noisy than 15 bins of ECE on a few hundred rows
    (on the pooled held-out images of five photo sets, docs/openworld.md, the in-sample ECE test was
    worse than no test at all). Folds are stratified by label, rows dealt in turn.
    """
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    fold = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        fold[rows] = np.arange(len(rows)) % folds
    if len(np.unique(fold)) < 2:
        return False  # one row a class: nothing to test a temperature on
    scaled = np.empty_like(logits)
    for f in np.unique(fold):
        held = fold == f
        scaled[held] = logits[held] / fit_temperature(logits[~held], y[~held])
    return _nll(scaled, y, 1.0) < _nll(logits, y, 1.0)
