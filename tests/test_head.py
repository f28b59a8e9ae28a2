from __future__ import annotations

import numpy as np
import pytest

from retrain.head import NotFittedError, SoftmaxHead


def _blobs(n=300, d=32, c=3, seed=0, spread=0.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (c, d))
    y = rng.integers(0, c, n)
    return (centres[y] + rng.normal(0, spread, (n, d))).astype(np.float32), y


def test_learns_separable_classes():
    X, y = _blobs()
    head = SoftmaxHead(steps=300, seed=0).fit(
        X[:200], y[:200], n_classes=3, X_val=X[200:250], y_val=y[200:250]
    )
    assert (head.predict(X[250:]) == y[250:]).mean() > 0.95
    assert head.predict_proba(X[:5]).sum(axis=1) == pytest.approx(np.ones(5), abs=1e-5)


def test_same_seed_same_weights_bit_for_bit():
    X, y = _blobs()
    a = SoftmaxHead(steps=100, seed=7).fit(X, y, n_classes=3)
    b = SoftmaxHead(steps=100, seed=7).fit(X, y, n_classes=3)
    c = SoftmaxHead(steps=100, seed=8).fit(X, y, n_classes=3)
    assert np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
    assert not np.array_equal(a.coef_, c.coef_)


def test_shuffled_labels_do_not_reach_high_test_accuracy():
    """The test that must fail if evaluation leaks: random labels carry no signal."""
    X, y = _blobs(n=600, c=4)
    y_random = np.random.default_rng(1).permutation(y)
    head = SoftmaxHead(steps=500, seed=0).fit(
        X[:400], y_random[:400], n_classes=4, X_val=X[400:500], y_val=y_random[400:500]
    )
    assert (head.predict(X[500:]) == y_random[500:]).mean() < 0.5


def test_resume_gives_the_same_result_as_one_run():
    X, y = _blobs()
    full = SoftmaxHead(steps=200, seed=3).fit(X, y, n_classes=3, eval_every=10)
    states = []
    SoftmaxHead(steps=200, seed=3).fit(
        X,
        y,
        n_classes=3,
        eval_every=10,
        on_eval=lambda r, h: states.append(_copy(h.state_dict())) if r.step == 120 else None,
    )
    resumed = SoftmaxHead(steps=200, seed=3).fit(X, y, n_classes=3, eval_every=10, resume_state=states[0])
    assert np.array_equal(full.coef_, resumed.coef_)


def _copy(state):
    import copy

    return copy.deepcopy(state)


def test_class_balance_policies_and_errors():
    X, y = _blobs()
    for policy in ("sample", "weight", "none"):
        SoftmaxHead(steps=20, class_balance=policy, seed=0).fit(X, y, n_classes=3)
    with pytest.raises(ValueError, match="class_balance must be one of"):
        SoftmaxHead(class_balance="nope")
    with pytest.raises(NotFittedError, match="call fit"):
        SoftmaxHead().predict(X)
    head = SoftmaxHead(steps=5, seed=0).fit(X, y, n_classes=3)
    with pytest.raises(ValueError, match="expects \\(N, 32\\)"):
        head.predict(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "momentum"])
def test_weight_decay_shrinks_the_weights_with_every_optimizer(optimizer):
    X, y = _blobs()
    plain = SoftmaxHead(steps=200, seed=0, optimizer=optimizer).fit(X, y, n_classes=3)
    decayed = SoftmaxHead(steps=200, seed=0, optimizer=optimizer, weight_decay=0.5).fit(X, y, n_classes=3)
    assert np.abs(decayed.coef_).sum() < 0.8 * np.abs(plain.coef_).sum()


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "momentum"])
def test_per_class_products_and_one_matmul_train_the_same_head(monkeypatch, optimizer):
    """Few classes take the matrix-vector path, many the matmul path: both must be the same maths."""
    X, y = _blobs(c=3)
    fast = SoftmaxHead(steps=150, seed=2, optimizer=optimizer).fit(
        X, y, n_classes=3, X_val=X[:50], y_val=y[:50]
    )
    monkeypatch.setattr(SoftmaxHead, "GEMV_CLASSES", 0)
    general = SoftmaxHead(steps=150, seed=2, optimizer=optimizer).fit(
        X, y, n_classes=3, X_val=X[:50], y_val=y[:50]
    )
    assert np.allclose(fast.coef_, general.coef_, atol=1e-5) and np.allclose(
        fast.intercept_, general.intercept_, atol=1e-5
    )
    assert fast.coef_.flags.c_contiguous and fast.coef_.shape == (X.shape[1], 3)


def test_resume_with_momentum_and_weight_decay_matches_one_run():
    X, y = _blobs()
    kw = {"steps": 120, "seed": 4, "optimizer": "momentum", "weight_decay": 0.01}
    full = SoftmaxHead(**kw).fit(X, y, n_classes=3, eval_every=10)
    states = []
    SoftmaxHead(**kw).fit(
        X,
        y,
        n_classes=3,
        eval_every=10,
        on_eval=lambda r, h: states.append(_copy(h.state_dict())) if r.step == 60 else None,
    )
    resumed = SoftmaxHead(**kw).fit(X, y, n_classes=3, eval_every=10, resume_state=states[0])
    assert np.array_equal(full.coef_, resumed.coef_)
