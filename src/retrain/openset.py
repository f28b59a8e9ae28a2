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


def normalize(X: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows scaled to unit L2 norm: direction carries the class, length mostly contrast."""
    X = np.asarray(X, dtype=dtype)
    return X / np.maximum(np.sqrt(np.einsum("ij,ij->i", X, X))[:, None], 1e-12)


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
    """Class counts (C,), means (C, D), residuals R (N, D) from the own class mean, their squared
    norms ``sq`` (N,) and the within-class scatter W = R^T R (D, D) of normalised features centred
    on their overall mean.

    Float32 throughout (residuals are small and centred: no cancellation worth float64), with
    float64 means and sums.
    """

    def __init__(self, Xn: np.ndarray, y: np.ndarray, n_classes: int):
        self.center = Xn.mean(axis=0, dtype=np.float64)  # (D,)
        self.Xc = (Xn - self.center.astype(Xn.dtype)).astype(np.float32, copy=False)
        self.y = y
        self.counts = np.bincount(y, minlength=n_classes)
        sums = class_sums(self.Xc, y, n_classes)
        self.means = sums / np.maximum(self.counts, 1)[:, None]  # (C, D), centred coordinates
        self.R = self.Xc - self.means[y].astype(np.float32)  # (N, D)
        self.sq = np.einsum("ij,ij->i", self.R, self.R).astype(np.float64)  # (N,)
        self.W = gram(self.R)


def class_sums(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class row sums (C, D) in float64, as one product with the one-hot matrix (np.add.at is slow)."""
    onehot = np.zeros((n_classes, len(y)), dtype=np.float32)
    onehot[y, np.arange(len(y))] = 1.0
    return (onehot @ X).astype(np.float64)


def gram(R: np.ndarray) -> np.ndarray:
    """R^T R (D, D), float32."""
    return R.T @ R


MIN_SHRINKAGE = 1e-3


def _shrunk_cov(W: np.ndarray, sq: np.ndarray, dof: int) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf shrunk covariance (D, D, float32) of residual rows whose scatter is ``W`` and
    whose squared norms are ``sq`` (n,) (``dof`` = rows minus fitted means), and the shrinkage intensity."""
    d = W.shape[0]
    S = np.asarray(W, np.float32) / np.float32(max(dof, 1))
    mu = float(np.trace(S, dtype=np.float64)) / d
    if not mu > 1e-12:  # no spread at all (e.g. one image per class): plain Euclidean distance
        return np.eye(d, dtype=np.float32) * 1e-4, 1.0
    # Ledoit-Wolf (2004): intensity beta / delta, from the residuals' fourth moments.
    sq = np.asarray(sq, np.float64)
    n = max(len(sq), 1)
    S[np.diag_indices(d)] -= mu
    flat = S.ravel()
    delta = float(flat @ flat)  # ||S - mu I||^2
    beta = ((sq**2).sum() / n - (delta + d * mu * mu)) / n  # ||S||^2 = ||S - mu I||^2 + d mu^2
    # At least MIN_SHRINKAGE: with fewer rows than dimensions the sample covariance is singular, and a
    # zero estimate (tiny n gives noisy fourth moments) would leave no positive-definite matrix to invert.
    alpha = float(np.clip(beta / delta, MIN_SHRINKAGE, 1.0)) if delta > 0 else 1.0
    S *= np.float32(1 - alpha)
    S[np.diag_indices(d)] += mu
    return S, alpha


def _whitener(W: np.ndarray, sq: np.ndarray, dof: int) -> tuple[np.ndarray, float]:
    """W (D, D) with W W^T = inverse of the shrunk covariance; returns (whitener, shrinkage).

    Factorised in float32: the model file stores it in float16, whose rounding is far larger."""
    cov, alpha = _shrunk_cov(W, sq, dof)
    return _whitening32(cov).astype(np.float64), alpha


def _times_upper(X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """``X @ U`` for an upper-triangular ``U`` (D, D), skipping its zero lower-left blocks: about 55%
    of a full product's work at D = 1280 (NumPy has no triangular product)."""
    d = len(U)
    if d <= 256:
        return X @ U
    h = d // 2
    out = np.empty((len(X), d), dtype=np.result_type(X, U))
    out[:, :h] = _times_upper(X[:, :h], U[:h, :h])
    out[:, h:] = X[:, :h] @ U[:h, h:]
    out[:, h:] += _times_upper(X[:, h:], U[h:, h:])
    return out


def _whitening32(cov: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` (D, D, float32) with U U^T = cov^-1, i.e. x cov^-1 x^T = ||x U||^2.

    Float32 throughout: the per-fold and per-class scores only choose a quantile and an AUROC, the
    exported whitener is stored in float16, and shrinkage keeps cov well conditioned (at least
    MIN_SHRINKAGE of its mean variance on the diagonal)."""
    return _inverse_cholesky(np.asarray(cov, np.float32)).T


def _inverse_cholesky(A: np.ndarray) -> np.ndarray:
    """Lower-triangular ``L^-1`` where A = L L^T, by 2x2 blocks: the factor and its inverse together,
    almost all matrix products (half the time of LAPACK's factorisation followed by the inverse)."""
    d = len(A)
    if d <= 160:
        return np.linalg.inv(np.linalg.cholesky(A))
    h = d // 2
    inv11 = _inverse_cholesky(A[:h, :h])
    L21 = _times_upper(A[h:, :h], inv11.T)  # A21 L11^-T
    inv22 = _inverse_cholesky(A[h:, h:] - L21 @ L21.T)  # the Schur complement's factor
    out = np.zeros_like(A)
    out[:h, :h], out[h:, h:] = inv11, inv22
    out[h:, :h] = -_times_upper(L21.T, inv22.T).T @ inv11  # -L22^-1 L21 L11^-1
    return out


def _solve_scores(cov: np.ndarray, means: np.ndarray, Xc: np.ndarray) -> np.ndarray:
    """The score of centred rows ``Xc`` (n, D) against centred ``means`` (C', D) under ``cov``."""
    U = _whitening32(cov)  # (D, D)
    Z = _times_upper(np.asarray(Xc, np.float32), U)  # (n, D)
    M = _times_upper(np.asarray(means, np.float32), U)  # (C', D)
    d2 = (Z * Z).sum(axis=1, keepdims=True) - 2 * Z @ M.T + (M * M).sum(axis=1)  # (n, C')
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / Xc.shape[1])


def fit_stats(X: np.ndarray, y: np.ndarray, n_classes: int) -> MahalanobisStats:
    """Class means and the shared shrunk covariance of features ``X`` (N, D) with labels ``y`` (N,)."""
    return _fitted(_Scatter(normalize(X, np.float32), np.asarray(y, dtype=np.int64), n_classes))


def _fitted(sc: _Scatter) -> MahalanobisStats:
    present = sc.counts > 0
    return _stats(sc.center, sc.means, present, sc.W, sc.sq, len(sc.y) - int(present.sum()))


def _stats(center, means, present, W, sq, dof) -> MahalanobisStats:
    whitener, alpha = _whitener(W, sq, dof)
    # The model file stores the whitener in float16; round it here so that the threshold is chosen
    # on exactly the scores the exported graph computes.
    whitener = whitener.astype(np.float16).astype(np.float64)
    return MahalanobisStats(center, whitener, means @ whitener, present, alpha)


def out_of_fold_scores(X: np.ndarray, y: np.ndarray, fold: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's score under statistics fitted on the rows of the other folds (N,).

    ``fold`` (N,) is the fold each row is held out in (as :func:`retrain.crossfit.cross_fit` returns);
    rows with fold -1 are always fitted on and get NaN.
    """
    return _out_of_fold(
        _Scatter(normalize(X, np.float32), np.asarray(y, dtype=np.int64), n_classes), np.asarray(fold)
    )


def _out_of_fold(sc: _Scatter, fold: np.ndarray) -> np.ndarray:
    y, n_classes = sc.y, len(sc.counts)
    out = np.full(len(y), np.nan)
    for f in np.unique(fold[fold >= 0]):
        held = fold == f
        keep = ~held
        counts = np.bincount(y[keep], minlength=n_classes)
        # Means without fold f, as offsets d_c from the full-class means: mu_c,-f = mu_c + d_c, and
        # sum over kept rows of (r - d)(r - d)^T = sum r r^T - n d d^T (r: residual from mu_c).
        R_held = sc.R[held]
        # Residuals from the full-class means sum to 0 per class, so the kept rows' sums are minus the held.
        offsets = -class_sums(R_held, y[held], n_classes) / np.maximum(counts, 1)[:, None]  # (C, D)
        W = sc.W - gram(R_held) - ((offsets.T * counts) @ offsets).astype(np.float32)
        present = counts > 0
        if not present.any():
            continue
        # Squared norms of the kept residuals from the fold-less means: ||r - d||^2 = ||r||^2 - 2 r.d + ||d||^2.
        y_keep = y[keep]
        rd = (sc.R @ offsets.T.astype(np.float32))[keep][np.arange(len(y_keep)), y_keep]  # (n,)
        sq = sc.sq[keep] - 2 * rd + (offsets**2).sum(axis=1)[y_keep]
        cov, _ = _shrunk_cov(W, sq, int(keep.sum() - present.sum()))
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
    sc = _Scatter(normalize(X_fit, np.float32), np.asarray(y_fit, np.int64), n_classes)
    return _leave_one_class_out(sc, X_known, np.asarray(y_known, np.int64))


# The leave-one-class-out AUROC compares at most this many known rows with at most this many fitted rows
# of the left-out class (and all its known rows): an AUROC from hundreds of rows on each side is good to
# a point or two, and beyond that each row only costs a D x D product per class (a third of the cost at
# 10,000 images). Evenly spaced, so the same rows every time.
LOCO_MAX_KNOWN = 600
LOCO_MAX_UNKNOWN = 400


# A class of at most this many images per feature dimension leaves the statistics by a Woodbury downdate
# (its n_c x n_c system costs less than a D x D refactorisation); larger ones are refitted.
DOWNDATE_MAX = 0.5


def loco_rows(y_fit: np.ndarray, y_known: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the leave-one-class-out comparison for class ``c``: known = ``y_known`` rows of other
    classes (at most LOCO_MAX_KNOWN); unknown = ``y_fit`` rows of ``c`` (at most LOCO_MAX_UNKNOWN), then
    every ``y_known`` row of ``c`` (index arrays, that order)."""
    known, fit = np.flatnonzero(y_known != c), np.flatnonzero(y_fit == c)
    return _evenly(known, LOCO_MAX_KNOWN), _evenly(fit, LOCO_MAX_UNKNOWN), np.flatnonzero(y_known == c)


def _evenly(idx: np.ndarray, cap: int) -> np.ndarray:
    if len(idx) <= cap:
        return idx
    return idx[np.linspace(0, len(idx) - 1, cap).round().astype(np.int64)]


def _leave_one_class_out(sc: _Scatter, X_known: np.ndarray, y_known: np.ndarray) -> dict[int, float]:
    return {c: auroc(k, u) for c, (k, u) in _leave_one_class_out_scores(sc, X_known, y_known).items()}


def _leave_one_class_out_scores(sc: _Scatter, X_known: np.ndarray, y_known: np.ndarray, exact: bool = False):
    """Per class c: (known scores, unknown scores) under statistics fitted without c, rows as :func:`loco_rows`.

    Class c's rows leave the means and the scatter exactly. Unless ``exact``, a class of at most D/2 rows
    keeps the full data's shrinkage intensity (scaled to its own mean variance), which turns its covariance
    into a rank-n_c downdate of the full one: one factorisation serves every class (Woodbury,
    :func:`_downdated_scores`) instead of one D x D factorisation each.
    """
    y_fit = sc.y
    known_c = normalize(X_known, np.float32) - sc.center.astype(np.float32)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    present = sc.counts > 0
    small = sc.counts <= DOWNDATE_MAX * len(sc.W)  # the classes a downdate serves
    full = None if exact or not small[present].any() else _Whitened(sc, known_c, small[y_fit])
    for c in np.flatnonzero(present):
        others = present.copy()
        others[c] = False
        k_idx, u_fit, u_known = loco_rows(y_fit, y_known, c)
        if not others.any() or not len(k_idx):
            continue
        keep = y_fit != c
        scores = None
        if full is not None and small[c]:
            scores = _downdated_scores(full, sc, c, others, k_idx, u_fit, u_known)
        if scores is None:
            cov, _ = _shrunk_cov(sc.W - gram(sc.R[~keep]), sc.sq[keep], int(keep.sum() - others.sum()))
            rows = np.concatenate([known_c[k_idx], sc.Xc[u_fit], known_c[u_known]])
            scores = _solve_scores(cov, sc.means[others], rows)
        out[int(c)] = (scores[: len(k_idx)], scores[len(k_idx) :])
    return out


class _Whitened:
    """The full data's shrunk covariance S = a W + b I and, whitened by it (z = x U, U U^T = S^-1): the
    residuals ``ZR`` (N, D; only the ``rows`` asked for, zero elsewhere), class means ``ZM`` (C, D) and
    the known rows ``ZK`` (T, D)."""

    def __init__(self, sc: _Scatter, known_c: np.ndarray, rows: np.ndarray):
        d = len(sc.W)
        dof = len(sc.y) - int((sc.counts > 0).sum())
        cov, self.alpha = _shrunk_cov(sc.W, sc.sq, dof)
        self.trace_w = float(np.trace(sc.W, dtype=np.float64))
        mu = self.trace_w / max(dof, 1) / d
        self.a, self.b = (1 - self.alpha) / max(dof, 1), self.alpha * mu  # S = a W + b I
        U = _whitening32(cov)
        self.ZR = np.zeros_like(sc.R)
        self.ZR[rows] = _times_upper(sc.R[rows], U)
        self.ZM = _times_upper(sc.means.astype(np.float32), U)
        self.ZK = _times_upper(known_c, U)


def _downdated_scores(
    full: _Whitened, sc: _Scatter, c: int, others, k_idx, u_fit, u_known
) -> np.ndarray | None:
    """Scores of the :func:`loco_rows` rows under kappa (S - a R_c^T R_c): S without class c's scatter,
    kappa matching its trace to class c's left-out mean variance. With Q = R_c U and K = I - a Q Q^T
    (n_c, n_c) = G G^T, Woodbury gives x (S - a R_c^T R_c)^-1 x^T = ||z||^2 + a ||G^-1 Q z^T||^2.
    None where there is no spread to scale by (the full data's or the rest's): the exact path handles those."""
    d = len(sc.W)
    rows_c = sc.y == c
    trace_c = full.trace_w - float(sc.sq[rows_c].sum())  # trace of W without class c
    dof_c = len(sc.y) - int(rows_c.sum()) - int(others.sum())
    if not (full.b > 0 and trace_c / max(dof_c, 1) / d > 1e-12):
        return None
    Q = full.ZR[rows_c]  # (n_c, D): class c's whitened residuals, every one of them
    K = np.eye(len(Q), dtype=np.float32) - np.float32(full.a) * (Q @ Q.T)
    try:
        P = _inverse_cholesky(K) @ Q  # (n_c, D)
    except np.linalg.LinAlgError:  # K is positive definite in exact arithmetic; float32 may disagree
        return None
    # class c's scored rows: (r + mu_c) U
    Z = np.concatenate([full.ZK[k_idx], full.ZR[u_fit] + full.ZM[c], full.ZK[u_known]])
    M = full.ZM[others]
    pz, pm = Z @ P.T, M @ P.T
    d2 = (Z * Z).sum(axis=1, keepdims=True) - 2 * Z @ M.T + (M * M).sum(axis=1)
    d2 += full.a * ((pz * pz).sum(axis=1, keepdims=True) - 2 * pz @ pm.T + (pm * pm).sum(axis=1))
    kappa = (trace_c / max(dof_c, 1) / d) / (full.a * trace_c / d + full.b)  # its mean variance / ours
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / kappa / d)


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
        sc = _Scatter(normalize(X, np.float32), np.asarray(y, np.int64), n_classes)
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
