"""An "unknown" score from the features and the logits: far from every class, claimed by none.

Two terms, each put on the scale of held-out known images (0 at their median, 1 at their 95th
percentile) and added:

* Mahalanobis distance from the (L2-normalised) features to the nearest class mean under one
  covariance shared by all classes (Ledoit-Wolf shrinkage, so it stays well conditioned with fewer
  images than feature dimensions): ``sqrt(min_c (x - mu_c)^T S^-1 (x - mu_c) / D)``. It catches
  photos of another kind altogether.
* energy, ``-logsumexp(logits / T)``: no class claims the image. It catches near misses, a new
  class that looks like the trained ones.

The combination was chosen by measurement over either term alone, max-softmax and nearest
neighbours (docs/openworld.md). The exported graph computes it; the Mahalanobis term costs
D*D float16 weights whatever the number of training images (3.3 MB at D = 1280).

Out-of-fold scores (each row scored by statistics fitted without its fold) pick the automatic
threshold; leave-one-class-out AUROC estimates how well unseen kinds of photo are noticed.
Both reuse one pass of per-class scatter matrices: nothing is recomputed per fold or class
but a Cholesky factorisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

METHOD = "mahalanobis+energy"
DEFAULT_ACCEPT = 0.95  # the automatic threshold keeps this share of known (out-of-fold) images


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64): direction carries the class, length mostly contrast."""
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


@dataclass
class MahalanobisStats:
    """Fitted statistics: ``center`` (D,), ``whitener`` (D, D) and whitened class ``means`` (C, D).

    ``score(X)`` = sqrt(min_c ||(x - center) W - means_c||^2 / D) for L2-normalised x. Classes
    without rows have no mean (``present`` marks those that do).
    """

    center: np.ndarray
    whitener: np.ndarray
    means: np.ndarray
    present: np.ndarray
    shrinkage: float

    def score(self, X: np.ndarray, normalized: bool = False) -> np.ndarray:
        Xn = X if normalized else normalize(X)
        Z = (Xn - self.center) @ self.whitener  # (N, D)
        M = self.means[self.present]  # (C', D)
        d2 = (Z * Z).sum(axis=1, keepdims=True) - 2 * Z @ M.T + (M * M).sum(axis=1)  # (N, C')
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / Z.shape[1])


class _Scatter:
    """Class counts (C,), means (C, D), residuals R (N, D) from the own class mean and the within-class
    scatter W = R^T R (D, D) of normalised features centred on their overall mean.

    The (N, D) products run in float32 (residuals are small and centred: no cancellation); the
    (D, D) results are float64 for the factorisations.
    """

    def __init__(self, Xn: np.ndarray, y: np.ndarray, n_classes: int):
        self.center = Xn.mean(axis=0)  # (D,)
        self.Xc = (Xn - self.center).astype(np.float32)
        self.y = y
        self.counts = np.bincount(y, minlength=n_classes)
        sums = class_sums(self.Xc, y, n_classes)
        self.means = sums / np.maximum(self.counts, 1)[:, None]  # (C, D), centred coordinates
        self.R = self.Xc - self.means[y].astype(np.float32)  # (N, D)
        self.W = gram(self.R)


def class_sums(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class row sums (C, D) in float64, as one product with the one-hot matrix (np.add.at is slow)."""
    onehot = np.zeros((n_classes, len(y)), dtype=np.float32)
    onehot[y, np.arange(len(y))] = 1.0
    return (onehot @ X).astype(np.float64)


def gram(R: np.ndarray) -> np.ndarray:
    """R^T R (D, D) in float64, computed in float32."""
    return (R.T @ R).astype(np.float64)


MIN_SHRINKAGE = 1e-3


def _shrunk_cov(W: np.ndarray, R: np.ndarray, dof: int) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf shrunk covariance (D, D) of residual rows R (n, D) whose scatter is ``W``
    (``dof`` = rows minus fitted means), and the shrinkage intensity."""
    d = W.shape[0]
    S = W / max(dof, 1)
    mu = np.trace(S) / d
    if not mu > 1e-12:  # no spread at all (e.g. one image per class): plain Euclidean distance
        return np.eye(d) * 1e-4, 1.0
    # Ledoit-Wolf (2004): intensity beta / delta, from the residuals' fourth moments.
    n = max(len(R), 1)
    S[np.diag_indices(d)] -= mu
    delta = float((S * S).sum())  # ||S - mu I||^2
    sq = (R * R).sum(axis=1, dtype=np.float64)
    beta = ((sq**2).sum() / n - (delta + d * mu * mu)) / n  # ||S||^2 = ||S - mu I||^2 + d mu^2
    # At least MIN_SHRINKAGE: with fewer rows than dimensions the sample covariance is singular, and a
    # zero estimate (tiny n gives noisy fourth moments) would leave no positive-definite matrix to invert.
    alpha = float(np.clip(beta / delta, MIN_SHRINKAGE, 1.0)) if delta > 0 else 1.0
    S *= 1 - alpha
    S[np.diag_indices(d)] += mu
    return S, alpha


def _whitener(W: np.ndarray, R: np.ndarray, dof: int) -> tuple[np.ndarray, float]:
    """W (D, D) with W W^T = inverse of the shrunk covariance; returns (whitener, shrinkage)."""
    cov, alpha = _shrunk_cov(W, R, dof)
    # cov = L L^T, so cov^-1 = (L^-1)^T L^-1 and x cov^-1 x^T = ||x (L^-1)^T||^2.
    return _inv_lower(np.linalg.cholesky(cov)).T, alpha


def _inv_lower(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 blocks, so nearly all the work is matrix products
    (NumPy has no triangular solve; a general inverse costs 6x more)."""
    d = len(L)
    if d <= 128:
        return np.linalg.inv(L)
    h = d // 2
    A_inv, C_inv = _inv_lower(L[:h, :h]), _inv_lower(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h], out[h:, h:] = A_inv, C_inv
    out[h:, :h] = -C_inv @ L[h:, :h] @ A_inv
    return out


def _solve_scores(cov: np.ndarray, means: np.ndarray, Xc: np.ndarray) -> np.ndarray:
    """The score of centred rows ``Xc`` (n, D) against centred ``means`` (C', D) under ``cov``."""
    Wt = _inv_lower(np.linalg.cholesky(cov)).T.astype(np.float32)  # (D, D)
    Z = Xc @ Wt  # (n, D)
    M = (means @ Wt.astype(np.float64)).astype(np.float32)  # (C', D)
    d2 = (Z * Z).sum(axis=1, keepdims=True) - 2 * Z @ M.T + (M * M).sum(axis=1)  # (n, C')
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / Xc.shape[1])


def fit_stats(X: np.ndarray, y: np.ndarray, n_classes: int) -> MahalanobisStats:
    """Class means and the shared shrunk covariance of features ``X`` (N, D) with labels ``y`` (N,)."""
    return _fitted(_Scatter(normalize(X), np.asarray(y, dtype=np.int64), n_classes))


def _fitted(sc: _Scatter) -> MahalanobisStats:
    present = sc.counts > 0
    return _stats(sc.center, sc.means, present, sc.W, sc.R, len(sc.y) - int(present.sum()))


def _stats(center, means, present, W, R, dof) -> MahalanobisStats:
    whitener, alpha = _whitener(W, R, dof)
    # The model file stores the whitener in float16; round it here so that the threshold is chosen
    # on exactly the scores the exported graph computes.
    whitener = whitener.astype(np.float16).astype(np.float64)
    return MahalanobisStats(center, whitener, means @ whitener, present, alpha)


def out_of_fold_scores(X: np.ndarray, y: np.ndarray, fold: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's score under statistics fitted on the rows of the other folds (N,).

    ``fold`` (N,) is the fold each row is held out in (as :func:`retrain.crossfit.cross_fit` returns);
    rows with fold -1 are always fitted on and get NaN.
    """
    return _out_of_fold(_Scatter(normalize(X), np.asarray(y, dtype=np.int64), n_classes), np.asarray(fold))


def _out_of_fold(sc: _Scatter, fold: np.ndarray) -> np.ndarray:
    y, n_classes = sc.y, len(sc.counts)
    out = np.full(len(y), np.nan)
    for f in np.unique(fold[fold >= 0]):
        held = fold == f
        keep = ~held
        counts = np.bincount(y[keep], minlength=n_classes)
        # Means without fold f, as offsets d_c from the full-class means: mu_c,-f = mu_c + d_c, and
        # sum over kept rows of (r - d)(r - d)^T = sum r r^T - n d d^T (r: residual from mu_c).
        sums = class_sums(sc.R[keep], y[keep], n_classes)
        offsets = sums / np.maximum(counts, 1)[:, None]  # (C, D)
        Rf = sc.R[held]
        W = sc.W - gram(Rf) - (offsets.T * counts) @ offsets
        present = counts > 0
        if not present.any():
            continue
        R_keep = sc.R[keep] - offsets[y[keep]].astype(np.float32)
        cov, _ = _shrunk_cov(W, R_keep, int(keep.sum() - present.sum()))
        out[held] = _solve_scores(cov, (sc.means + offsets)[present], sc.Xc[held])
    return out


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that an unknown image scores higher than a known one (ties count half)."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if not len(known) or not len(unknown):
        return float("nan")
    both = np.concatenate([known, unknown])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # Average ranks for ties.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    r_unknown = ranks[len(known) :].sum()
    return float((r_unknown - len(unknown) * (len(unknown) + 1) / 2) / (len(known) * len(unknown)))


def leave_one_class_out(
    X_fit: np.ndarray, y_fit: np.ndarray, X_known: np.ndarray, y_known: np.ndarray, n_classes: int
) -> dict[int, float]:
    """AUROC per class c of the score fitted without class c: known = ``X_known`` rows of the other
    classes (never fitted on), unknown = every row of class c (``X_fit`` and ``X_known``)."""
    sc = _Scatter(normalize(X_fit), np.asarray(y_fit, np.int64), n_classes)
    return _leave_one_class_out(sc, X_known, np.asarray(y_known, np.int64))


def loco_rows(y_fit: np.ndarray, y_known: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the leave-one-class-out comparison for class ``c``: known = ``y_known`` rows of other
    classes; unknown = ``y_fit`` rows of ``c``, then ``y_known`` rows of ``c`` (index arrays, that order)."""
    return np.flatnonzero(y_known != c), np.flatnonzero(y_fit == c), np.flatnonzero(y_known == c)


def _leave_one_class_out(sc: _Scatter, X_known: np.ndarray, y_known: np.ndarray) -> dict[int, float]:
    return {c: auroc(k, u) for c, (k, u) in _leave_one_class_out_scores(sc, X_known, y_known).items()}


def _leave_one_class_out_scores(sc: _Scatter, X_known: np.ndarray, y_known: np.ndarray):
    """Per class c: (known scores, unknown scores) under statistics fitted without c, rows as :func:`loco_rows`."""
    y_fit = sc.y
    known_c = (normalize(X_known) - sc.center).astype(np.float32)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    present = sc.counts > 0
    for c in np.flatnonzero(present):
        others = present.copy()
        others[c] = False
        k_idx, u_fit, u_known = loco_rows(y_fit, y_known, c)
        if not others.any() or not len(k_idx):
            continue
        keep = y_fit != c
        cov, _ = _shrunk_cov(sc.W - gram(sc.R[~keep]), sc.R[keep], int(keep.sum() - others.sum()))
        rows = np.concatenate([known_c[k_idx], sc.Xc[u_fit], known_c[u_known]])
        scores = _solve_scores(cov, sc.means[others], rows)
        out[int(c)] = (scores[: len(k_idx)], scores[len(k_idx) :])
    return out


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp of (temperature-scaled) logits (N,): high when no class claims the image."""
    z = np.asarray(logits, np.float64)
    m = z.max(axis=1)
    return -(m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def robust_scale(known: np.ndarray) -> tuple[float, float]:
    """(median, 95th percentile - median) of held-out known scores: puts two scores on one footing."""
    known = np.asarray(known, np.float64)
    known = known[np.isfinite(known)]
    if len(known) < 2:
        return 0.0, float("inf")  # nothing to scale by: the term drops out
    mid = float(np.median(known))
    return mid, max(float(np.quantile(known, DEFAULT_ACCEPT)) - mid, 1e-6)


@dataclass
class Combination:
    """unknown_score = (maha - maha_mid) / maha_spread + (energy - energy_mid) / energy_spread.

    Each term is about 0 for a typical known image and 1 at its 95th percentile; an infinite
    spread drops a term (no held-out logits to scale energy by).
    """

    maha_mid: float
    maha_spread: float
    energy_mid: float
    energy_spread: float

    def __call__(self, maha: np.ndarray, en: np.ndarray | None) -> np.ndarray:
        out = (np.asarray(maha, np.float64) - self.maha_mid) / self.maha_spread
        if en is not None and np.isfinite(self.energy_spread):
            out = out + (np.asarray(en, np.float64) - self.energy_mid) / self.energy_spread
        return out

    def to_dict(self) -> dict:
        return {k: (v if np.isfinite(v) else None) for k, v in self.__dict__.items()}


def choose_threshold(known_scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The score below which ``accept`` of the known images fall (their ``accept`` quantile)."""
    s = np.asarray(known_scores, np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("inf")
    return float(np.quantile(s, accept))


@dataclass
class UnknownModel:
    """What the run fitted: the statistics the graph carries, the threshold and how it was chosen."""

    stats: MahalanobisStats
    combination: Combination
    threshold: float
    rule: str
    known_rejected: float  # share of out-of-fold known scores above the threshold
    out_of_fold_count: int
    loco_auroc: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def score(self, X: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
        """The graph's ``unknown_score`` for features ``X`` and their temperature-scaled ``logits``."""
        return self.combination(self.stats.score(X), None if logits is None else energy(logits))

    def manifest(self) -> dict:
        return {
            "method": METHOD,
            "combination": self.combination.to_dict(),
            "features": "l2-normalized",
            "output": "unknown_score",
            "threshold": self.threshold if np.isfinite(self.threshold) else None,  # None: never unknown
            "rule": self.rule,
        }

    def to_dict(self) -> dict:
        aucs = [v for v in self.loco_auroc.values() if np.isfinite(v)]
        return {
            **self.manifest(),
            "shrinkage": round(self.stats.shrinkage, 6),
            "out_of_fold_count": self.out_of_fold_count,
            "known_rejected_out_of_fold": round(self.known_rejected, 6),
            "leave_one_class_out_auroc": {k: round(v, 6) for k, v in self.loco_auroc.items()},
            "leave_one_class_out_auroc_mean": round(float(np.mean(aucs)), 6) if aucs else None,
            "seconds": round(self.seconds, 3),
        }


def fit_unknown(
    X: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    *,
    labels: list[str],
    held_out_logits: np.ndarray | None = None,
    held_out_rows: np.ndarray | None = None,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    loco_energy=None,
    threshold: float | None = None,
    accept: float = DEFAULT_ACCEPT,
) -> UnknownModel:
    """Statistics from all rows of ``X`` (N, D), a threshold from held-out known scores, and the
    leave-one-class-out AUROC with ``X_test`` rows as the known images.

    Mahalanobis scores are out-of-fold (``fold``, N). ``held_out_logits`` (M, C, temperature-scaled)
    of rows ``held_out_rows`` come from layers that did not see them: their energies put the energy
    term on the same footing, and the threshold is chosen on those rows (all N with a cross-fit).
    Without them the score is the Mahalanobis term alone. ``loco_energy(c)`` gives (known, unknown)
    energies from a layer fitted without class c, rows as :func:`loco_rows`; without it the
    leave-one-class-out estimate uses the Mahalanobis term alone.
    ``threshold`` (e.g. ``--unknown_threshold``) replaces the automatic one.
    """
    t0 = time.perf_counter()
    with threadpool_limits(1, user_api="blas"):  # OpenBLAS threads collapse on a busy machine; one is plenty
        n_classes = len(labels)
        sc = _Scatter(normalize(X), np.asarray(y, np.int64), n_classes)
        stats = _fitted(sc)
        oof = _out_of_fold(sc, np.asarray(fold))
        loco_maha = (
            _leave_one_class_out_scores(sc, X_test, np.asarray(y_test, np.int64))
            if X_test is not None and y_test is not None and len(y_test)
            else {}
        )
    maha_mid, maha_spread = robust_scale(oof)
    if held_out_logits is not None and len(held_out_rows) >= 2:
        en = energy(held_out_logits)
        comb = Combination(maha_mid, maha_spread, *robust_scale(en))
        known = comb(oof[held_out_rows], en)
        where = "held-out scores"
    else:
        comb = Combination(maha_mid, maha_spread, 0.0, float("inf"))
        known = comb(oof, None)
        where = "out-of-fold Mahalanobis scores"
    known = known[np.isfinite(known)]
    if threshold is None:
        threshold = choose_threshold(known, accept)
        rule = f"accept {100 * accept:g}% of known images ({where}, N={len(known)})"
    else:
        rule = "--unknown_threshold"
    rejected = float((known > threshold).mean()) if len(known) else float("nan")
    loco: dict[str, float] = {}
    for c, (k, u) in loco_maha.items():
        ek, eu = loco_energy(c) if loco_energy is not None else (None, None)
        # The left-out layers train for fewer steps than the final one (their energies are on another
        # scale), so their energy term is scaled by their own known rows, as the final one by its own.
        loco_comb = comb if ek is None else Combination(maha_mid, maha_spread, *robust_scale(ek))
        loco[labels[c]] = auroc(loco_comb(k, ek), loco_comb(u, eu))
    return UnknownModel(
        stats, comb, float(threshold), rule, rejected, len(known), loco, time.perf_counter() - t0
    )
