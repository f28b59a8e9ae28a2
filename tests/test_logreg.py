"""The L-BFGS layer (retrain.logreg) and its cross-fit over C (retrain.crossfit.cross_fit_l2)."""

from __future__ import annotations

import numpy as np
import pytest

from retrain.crossfit import C_GRID, L2_TOLERANCE, cross_fit_l2
from retrain.logreg import LogisticHead, class_weights, fit_logistic


def _blobs(n=150, d=20, classes=3, spread=1.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, d))
    y = rng.integers(0, classes, n)
    # non-negative with a large common mean, like pooled ReLU features
    X = np.abs(centres[y] + spread * rng.normal(0, 1, (n, d))) + 3.0
    return X.astype(np.float32), y


def _gradient(X, y, W, b, l2, weights=None):
    """The penalised objective's gradient in float64, from scratch (no centring)."""
    X, W, b = X.astype(np.float64), W.astype(np.float64), b.astype(np.float64)
    z = X @ W + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    w = np.full(len(y), 1 / len(y)) if weights is None else weights / weights.sum()
    p *= w[:, None]
    return X.T @ p + l2 * W, p.sum(axis=0)


def test_the_solution_is_the_optimum_of_the_penalised_loss():
    X, y = _blobs()
    for l2 in (1e-1, 1e-2, 1e-3):
        W, b, iterations = fit_logistic(X, y, n_classes=3, l2=l2)
        gW, gb = _gradient(X, y, W, b, l2)
        assert 0 < iterations < 500
        assert max(np.abs(gW).max(), np.abs(gb).max()) < 1e-3, l2


def test_a_shift_of_every_feature_only_moves_the_bias():
    # The bias is not penalised, so x + v has the same weights: the centring inside must not change the answer.
    X, y = _blobs(seed=1)
    W, b, _ = fit_logistic(X, y, n_classes=3, l2=1e-2)
    shift = np.linspace(-2, 5, X.shape[1]).astype(np.float32)
    W2, b2, _ = fit_logistic(X + shift, y, n_classes=3, l2=1e-2)
    assert np.allclose(W, W2, atol=2e-3)
    assert np.allclose(X @ W + b, (X + shift) @ W2 + b2, atol=2e-2)


def test_a_warm_start_reaches_the_same_solution_in_fewer_iterations():
    X, y = _blobs(seed=2)
    near = fit_logistic(X, y, n_classes=3, l2=3e-2)
    cold = fit_logistic(X, y, n_classes=3, l2=1e-2)
    warm = fit_logistic(X, y, n_classes=3, l2=1e-2, init=near[:2])
    assert warm[2] < cold[2]
    assert np.allclose(X @ warm[0] + warm[1], X @ cold[0] + cold[1], atol=2e-2)


def test_balanced_weights_move_the_boundary_towards_the_large_class():
    X, y = _blobs(n=400, classes=2, spread=3.0, seed=3)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:40]])  # class 1 is rare
    X, y = X[keep], y[keep]
    w = class_weights(y, 2)
    assert np.isclose(w[y == 0].sum(), w[y == 1].sum())
    plain = LogisticHead(l2=1e-2).fit(X, y, n_classes=2)
    balanced = LogisticHead(l2=1e-2, balanced=True).fit(X, y, n_classes=2)
    assert (balanced.predict(X) == 1).sum() > (plain.predict(X) == 1).sum()
    gW, gb = _gradient(X, y, balanced.coef_, balanced.intercept_, 1e-2, w)
    assert max(np.abs(gW).max(), np.abs(gb).max()) < 1e-3


def test_the_head_has_the_softmax_head_outputs():
    X, y = _blobs(spread=0.5, seed=4)
    head = LogisticHead(l2=1e-2).fit(X, y, n_classes=3)
    assert head.coef_.shape == (20, 3) and head.intercept_.shape == (3,) and head.coef_.dtype == np.float32
    proba = head.predict_proba(X)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5) and (head.predict(X) == y).mean() > 0.8
    with pytest.raises(ValueError, match="no training images"):
        LogisticHead(l2=1.0).fit(X[:0], y[:0], n_classes=3)


def test_the_cross_fit_walks_c_from_strong_to_weak_and_stops_after_the_best():
    X, y = _blobs(n=200, spread=2.5, seed=5)
    cf = cross_fit_l2(X, y, n_classes=3, seed=0, patience=2)
    assert list(cf.curve_c) == list(C_GRID[: len(cf.curve_c)]) and cf.c in cf.curve_c
    best = list(cf.curve_c).index(cf.c)
    assert len(cf.curve_c) == len(C_GRID) or len(cf.curve_c) - 1 - best == 2
    assert cf.accuracy == cf.curve_accuracy[best] == (cf.logits.argmax(axis=1) == y).mean()
    assert cf.weight_decay == pytest.approx(1 / (cf.c * len(y))) and cf.best_steps == 0
    assert not len(cf.curve_steps) and cf.logits.shape == (200, 3) and set(cf.fold) == set(range(5))
    # chosen by the out-of-fold cross entropy; of near-equals (within L2_TOLERANCE) the stronger regularisation
    loss, tol = cf.curve_loss, L2_TOLERANCE
    assert all(v >= loss[best] * (1 - tol) for v in loss[best + 1 :])
    assert loss[best] < loss[0] or best == 0


def test_the_cross_fit_is_deterministic_and_keeps_copies_in_one_fold():
    X, y = _blobs(n=60, seed=6)
    X2, y2 = np.concatenate([X, X]), np.concatenate([y, y])
    groups = list(range(60)) * 2
    runs = [cross_fit_l2(X2, y2, n_classes=3, groups=groups, seed=3) for _ in range(2)]
    assert np.array_equal(runs[0].logits, runs[1].logits) and runs[0].c == runs[1].c
    assert np.array_equal(runs[0].fold[:60], runs[0].fold[60:])
    with pytest.raises(ValueError, match="at least 2"):
        cross_fit_l2(X[:1], y[:1], n_classes=3)


def test_solved_chains_match_direct_solves_and_warm_starts_change_nothing():
    from retrain.crossfit import solve_and_score_chains

    X, y = _blobs(n=240, seed=4)
    rows = np.arange(len(y))
    small, large, scored = rows[:80], rows[:180], rows[180:]
    (chain,) = solve_and_score_chains(X, y, [[(small, scored), (large, scored)]], n_classes=3, c=1.0)
    for train_idx, logits in zip((small, large), chain):
        W, b, _ = fit_logistic(X[train_idx], y[train_idx], n_classes=3, l2=1.0 / len(train_idx))
        # the same predictions as solving from zero (the second was warm-started from the first)
        assert (logits.argmax(axis=1) == (X[scored] @ W + b).argmax(axis=1)).mean() > 0.97
        assert np.allclose(logits, X[scored] @ W + b, atol=0.1)


def test_a_class_without_rows_keeps_its_set_aside_column_and_the_rest_is_the_smaller_problem():
    from retrain.crossfit import ABSENT_BIAS, solve_and_score_chains

    X, y = _blobs(n=240, classes=3, seed=5)
    full = fit_logistic(X, y, n_classes=3, l2=1e-2)
    without_1 = np.flatnonzero(y != 1)
    (chain,) = solve_and_score_chains(
        X, y, [[(without_1, np.arange(len(y)))]], n_classes=3, c=1.0, inits=[full[:2]]
    )
    logits = chain[0]
    assert np.all(logits[:, 1] < ABSENT_BIAS + 1)  # the absent class is never predicted
    two = np.where(y[without_1] == 2, 1, 0)  # the same rows as a two-class problem
    W, b, _ = fit_logistic(X[without_1], two, n_classes=2, l2=1.0 / len(without_1))
    both = logits[:, [0, 2]]
    assert (both.argmax(axis=1) == (X @ W + b).argmax(axis=1)).mean() > 0.97


def test_the_path_walks_past_a_plateau_at_the_strong_end():
    # Features of small norm: at C = 0.001 and 0.00316 the layer has barely moved from the class prior, the
    # loss sits near log(3) and falls by under 2% a value. That plateau is not the bottom of the curve.
    X, y = _blobs(n=200, spread=1.0, seed=7)
    X = (X - X.mean(axis=0)) * 0.02
    cf = cross_fit_l2(X, y, n_classes=3, seed=0)
    assert cf.curve_loss[1] > cf.curve_loss[0] * (1 - L2_TOLERANCE)  # the plateau is there
    assert cf.c >= 10.0 and cf.accuracy > 0.8  # past the plateau, where the layer learns (0.37 on it)
