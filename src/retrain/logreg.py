"""The final layer as an L2-regularised multinomial logistic regression, solved to convergence.

retrain.py trained the layer with a fixed number of mini-batch steps and kept the step that scored best
on a few validation images. On cached features the same layer can be solved exactly: minimise

    mean cross entropy(softmax(X @ W + b), y) + l2 / 2 * ||W||^2

with full-batch L-BFGS (the bias is not penalised). How much to regularise is the one setting; the
cross-fit chooses it (:func:`retrain.crossfit.cross_fit_l2`). On the real photo sets of
docs/benchmarks.md this matched a ``LogisticRegressionCV`` fitted by hand, where the step-counted layer
was up to 3 points below it (cutouts, 5 outer folds x 3 seeds).

``l2`` is the same number as ``--weight_decay`` for the step solver (whose gradient step adds
``weight_decay * W``); scikit-learn's ``C`` is ``1 / (l2 * n)`` for n training rows.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from retrain.head import SoftmaxHead
from retrain.sampling import ClassBalancedSampler

MAX_ITERATIONS = 500
TOLERANCE = 1e-4  # the largest gradient entry at convergence (scikit-learn's lbfgs default)
HISTORY = 10  # L-BFGS correction pairs


def strength(c: float, n: int) -> float:
    """The L2 strength that scikit-learn's ``C`` means for ``n`` rows (and, the same formula, the C of a strength)."""
    return 1.0 / (c * max(1, n))


def fit_logistic(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    l2: float,
    sample_weight: np.ndarray | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(W (D, C), b (C,), iterations) minimising the weighted mean cross entropy plus ``l2 / 2 * ||W||^2``.

    ``X`` (N, D) float32, ``y`` (N,). ``sample_weight`` (N,) is normalised to sum 1 (a weighted mean). ``init``
    warm-starts from another solution (e.g. the neighbouring strength's), which is where most of the
    cost of a path of strengths goes.
    """
    # Centred features: with an unpenalised bias, x - mean gives exactly the same solutions (the bias
    # absorbs W @ mean), and removing the large common mean of non-negative features makes the problem
    # far better conditioned (several times fewer iterations on the photo sets).
    X = np.asarray(X, dtype=np.float32)
    mean = X.mean(axis=0)
    X = X - mean
    n, d = X.shape
    Y = np.zeros((n, n_classes), dtype=np.float32)
    Y[np.arange(n), y] = 1.0
    w = np.full(n, 1.0 / n, np.float32) if sample_weight is None else _normalised(sample_weight)
    theta = np.zeros(d * n_classes + n_classes, dtype=np.float64)
    if init is not None:
        theta[: d * n_classes] = np.asarray(init[0], dtype=np.float64).ravel()
        theta[d * n_classes :] = np.asarray(init[1], dtype=np.float64) + mean @ init[0]  # the centred bias
    objective = _Objective(X, Y, w, float(l2))
    theta, iterations = _lbfgs(objective, theta, max_iterations, tolerance)
    W = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
    return W, (theta[d * n_classes :] - mean @ W).astype(np.float32), iterations


def _normalised(weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32)
    return w / w.sum()


class _Objective:
    """Value and gradient of the penalised loss at a flat parameter vector (W row-major, then b)."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, w: np.ndarray, l2: float):
        self.X, self.Y, self.w, self.l2 = X, Y, w[:, None], l2
        self.d, self.c = X.shape[1], Y.shape[1]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        d, c = self.d, self.c
        W = theta[: d * c].reshape(d, c)
        z = self.X @ W.astype(np.float32) + theta[d * c :].astype(np.float32)  # (N, C)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1, keepdims=True)
        loss = float((self.w * self.Y * (np.log(total) - z)).sum()) + 0.5 * self.l2 * float(
            W.ravel() @ W.ravel()
        )
        e /= total
        e -= self.Y
        e *= self.w  # d loss / d logits
        grad = np.empty_like(theta)
        grad[: d * c] = (self.X.T @ e).ravel()
        grad[: d * c] += self.l2 * theta[: d * c]
        grad[d * c :] = e.sum(axis=0)
        return loss, grad


def _lbfgs(objective, theta: np.ndarray, max_iterations: int, tolerance: float) -> tuple[np.ndarray, int]:
    """Limited-memory BFGS with a backtracking (Armijo) line search; returns (theta, iterations)."""
    f, g = objective(theta)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s), oldest first
    for iteration in range(max_iterations):
        if np.abs(g).max() <= tolerance:
            return theta, iteration
        direction = -_two_loop(g, pairs)
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction (numerical trouble): restart from the gradient
            pairs.clear()
            scale = max(1.0, float(np.linalg.norm(g)))
            direction, slope = -g / scale, -float(g @ g) / scale
        step = 1.0
        while True:
            candidate = theta + step * direction
            f_new, g_new = objective(candidate)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y_diff = candidate - theta, g_new - g
        curvature = float(y_diff @ s)
        if curvature > 1e-12:
            pairs.append((s, y_diff, 1.0 / curvature))
            if len(pairs) > HISTORY:
                pairs.pop(0)
        if step < 1e-10:  # no progress possible at this precision
            return candidate, iteration + 1
        theta, f, g = candidate, f_new, g_new
    return theta, max_iterations


def _two_loop(g: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """The inverse-Hessian estimate times ``g`` (Nocedal and Wright, algorithm 7.4)."""
    q = g.copy()
    alphas = []
    for s, y_diff, rho in reversed(pairs):
        a = rho * float(s @ q)
        alphas.append(a)
        q -= a * y_diff
    if pairs:
        s, y_diff, _ = pairs[-1]
        q *= float(s @ y_diff) / float(y_diff @ y_diff)
    else:
        q /= max(1.0, float(np.linalg.norm(g)))
    for (s, y_diff, rho), a in zip(pairs, reversed(alphas)):
        q += (a - rho * float(y_diff @ q)) * s
    return q


class LogisticHead(SoftmaxHead):
    """The exported layer fitted by :func:`fit_logistic` at strength ``l2``: same outputs as a
    :class:`~retrain.head.SoftmaxHead` (``coef_`` (D, C), ``intercept_`` (C,), ``predict_proba``).

    ``balanced``: weight each image by the inverse of its class's frequency (what ``--class_balance
    sample``/``weight`` do on average); by default every image counts once, as in the test accuracy.
    """

    def __init__(self, *, l2: float, balanced: bool = False):
        super().__init__(steps=1)
        self.l2, self.balanced = float(l2), balanced

    def fit(self, X: np.ndarray, y: np.ndarray, *, n_classes: int, **_ignored) -> LogisticHead:
        X = np.ascontiguousarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if len(y) == 0:
            raise ValueError("no training images")
        self.n_classes_, self.n_features_in_ = n_classes, X.shape[1]
        weights = class_weights(y, n_classes) if self.balanced else None
        with threadpool_limits(1, user_api="blas"):  # (N, D) x (D, C) products: threads only contend here
            self.coef_, self.intercept_, self.n_iter_ = fit_logistic(
                X, y, n_classes=n_classes, l2=self.l2, sample_weight=weights
            )
        return self

    def state_dict(self) -> dict:
        raise NotImplementedError(
            "an L-BFGS fit has no steps to resume; it is rerun from the cached features"
        )


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) weights, each class summing to the same total: the step solver's ``--class_balance weight``
    loss weights (fit_logistic normalises them)."""
    return ClassBalancedSampler(y, n_classes, "weight").weights
