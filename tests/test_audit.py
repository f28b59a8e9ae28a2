"""Audit computations on arrays: intervals, metrics, label issues, duplicates, learning curve."""

import numpy as np
import pytest

from retrain.audit import (
    accuracy_line,
    classification_metrics,
    find_duplicates,
    fit_saturating,
    learning_curve,
    nearest_neighbours,
    rank_label_issues,
    wilson_interval,
)
from retrain.crossfit import cross_fit


def blobs(n_per_class=40, n_classes=3, d=24, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(n_classes, d))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(0, 1, size=(len(y), d))
    return X.astype(np.float32), y


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(20, 21)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (77.3, 99.2)
    assert accuracy_line(20, 21) == "95.2% (N=21, 95% CI 77.3-99.2%)"
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and 0.25 < hi < 0.35  # honest at 0%: not the normal approximation's [0, 0]
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_classification_metrics_per_class_and_confusion():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 1, 0])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["count"] == 6
    a, b, c = m["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0
    assert c["precision"] is None and c["recall"] == 0.0 and c["f1"] is None  # never predicted
    assert b["recall_ci"][0] < 1.0 <= b["recall_ci"][1] + 1e-12


def test_label_issues_rank_flipped_labels_first():
    X, y = blobs(n_per_class=50, spread=0.5)
    rng = np.random.default_rng(3)
    flipped = rng.choice(len(y), size=8, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    cf = cross_fit(X, noisy, n_classes=3, head_params={"steps": 300}, folds=5, seed=0)
    issues = rank_label_issues(cf.proba, noisy)
    top = set(issues.order[:8])
    assert len(top & set(flipped)) >= 7
    # The suggestion for a flipped row is its true class, never the given one.
    assert all(issues.suggested[i] == y[i] for i in flipped if i in top)
    assert (issues.suggested != noisy).all()
    assert np.all(np.diff(issues.score[issues.order]) <= 0)


def test_label_issues_with_neighbours_also_rank_flips_first():
    X, y = blobs(n_per_class=50, spread=0.5)
    noisy = y.copy()
    noisy[[0, 60, 120]] = [1, 2, 0]
    cf = cross_fit(X, noisy, n_classes=3, head_params={"steps": 300}, folds=5, seed=0)
    issues = rank_label_issues(cf.proba, noisy, X=X, neighbours=10)
    assert set(issues.order[:3]) == {0, 60, 120}
    assert list(issues.suggested[[0, 60, 120]]) == [0, 1, 2]


def test_duplicates_exact_from_keys_and_near_from_features():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 32)).astype(np.float32)
    X[10] = X[3] + 0.01 * rng.normal(size=32)  # a near copy of row 3
    keys = [bytes([i]) * 20 for i in range(50)]
    keys[7] = keys[5]  # an exact copy of row 5 (same content key)
    X[7] = X[5]
    pairs = find_duplicates(X, keys, threshold=0.9)
    found = {(int(i), int(j), str(k)) for i, j, k in zip(pairs.i, pairs.j, pairs.kind)}
    assert found == {(5, 7, "exact"), (3, 10, "near")}
    assert pairs.similarity[list(pairs.kind).index("near")] > 0.99


def test_random_features_give_no_near_pairs_at_the_default_threshold():
    X = np.random.default_rng(1).normal(size=(400, 256)).astype(np.float32)
    assert len(find_duplicates(X, [i.to_bytes(20, "big") for i in range(400)])) == 0


def test_duplicates_in_blocks_equal_one_block():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(30, 16))
    X = np.concatenate([base, base + 0.02 * rng.normal(size=base.shape)]).astype(np.float32)
    keys = [i.to_bytes(20, "big") for i in range(60)]
    a, b = find_duplicates(X, keys, threshold=0.95), find_duplicates(X, keys, threshold=0.95, block=7)
    assert len(a) == 30 and np.array_equal(a.i, b.i) and np.array_equal(a.j, b.j)


def test_learning_curve_rises_and_the_fit_saturates():
    X, y = blobs(n_per_class=80, spread=3.0, d=32)
    fold = np.arange(len(y)) % 5
    curve = learning_curve(X, y, fold, n_classes=3, head_params={"steps": 300}, seeds=2, steps=200)
    assert curve.accuracy.shape == (2, 6) and curve.per_class.shape == (2, 6, 3)
    mean = curve.accuracy.mean(axis=0)
    assert mean[-1] > mean[0]
    assert curve.sizes[-1] == pytest.approx(len(y) * 4 / 5, abs=3)
    fit = fit_saturating(np.tile(curve.sizes, 2), curve.accuracy.ravel())
    assert fit is not None and fit(10_000) <= 1.0
    assert fit(2 * curve.sizes[-1]) >= fit(curve.sizes[-1])


def test_saturating_fit_recovers_a_known_curve():
    n = np.array([10, 20, 40, 80, 160, 320], dtype=float)
    acc = 0.95 - 0.8 * n**-0.5
    fit = fit_saturating(n, acc)
    assert fit.ceiling == pytest.approx(0.95, abs=0.01)
    assert fit(640) == pytest.approx(0.95 - 0.8 * 640**-0.5, abs=0.005)
    assert fit_saturating(n[:2], acc[:2]) is None


def brute_force_neighbours(X, k, groups):
    Z = X - X[np.unique(groups, return_index=True)[1]].mean(axis=0)
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    S = Z @ Z.T
    S[np.asarray(groups)[:, None] == np.asarray(groups)[None, :]] = -np.inf
    return np.sort(S, axis=1)[:, ::-1][:, :k], S


@pytest.mark.parametrize("n, block", [(60, 1024), (2600, 700)])  # 2600 > the probe: the bounded top-k
def test_nearest_neighbours_equal_brute_force_and_find_the_pairs(n, block):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(n, 24)).astype(np.float32)
    X[n - 1] = X[2] + 0.01  # a near copy
    groups = list(range(n))
    groups[5] = groups[4]  # rows 4 and 5 are copies: never each other's neighbour
    nearest = nearest_neighbours(X, 6, groups=groups, threshold=0.5, block=block)
    want, S = brute_force_neighbours(X, 6, groups)
    np.testing.assert_allclose(nearest.similarity, want, atol=1e-5)
    assert 5 not in nearest.index[4] and 4 not in nearest.index[5]
    assert np.all(np.diff(nearest.similarity, axis=1) <= 1e-7)  # most similar first
    i, j = np.nonzero(np.triu(S >= 0.5, 1))
    assert set(zip(nearest.pair_i.tolist(), nearest.pair_j.tolist())) == set(zip(i.tolist(), j.tolist()))
    assert (2, n - 1) in set(zip(nearest.pair_i.tolist(), nearest.pair_j.tolist()))


def test_cell_pass_finds_the_copies_and_nearly_all_neighbours_of_the_exact_pass():
    # Above exact_max rows the pass searches cells of similar rows; forced here on 3,000 rows in 30 blobs.
    X, _ = blobs(n_per_class=100, n_classes=30, d=32, spread=0.7)
    n = len(X)
    copies = [(i, i + 1500) for i in range(0, 1500, 50)]
    for a, b in copies:
        X[b] = X[a] + 0.01
    groups = list(range(n))
    groups[11] = groups[10]  # copies by content key: never each other's neighbour
    exact = nearest_neighbours(X, 10, groups=groups, threshold=0.9)
    cells = nearest_neighbours(X, 10, groups=groups, threshold=0.9, exact_max=500)
    assert exact.exact and not cells.exact
    pairs = list(zip(cells.pair_i.tolist(), cells.pair_j.tolist()))
    assert len(pairs) == len(set(pairs)) and all(i < j for i, j in pairs)  # each pair once, i < j
    assert set(copies) <= set(pairs) <= set(zip(exact.pair_i.tolist(), exact.pair_j.tolist()))
    assert 11 not in cells.index[10] and 10 not in cells.index[11]
    assert not ((cells.index == np.arange(n)[:, None]) & cells.valid).any()  # no row its own neighbour
    assert np.all(np.diff(cells.similarity, axis=1) <= 1e-7)
    same = np.mean([len(set(e) & set(c)) / 10 for e, c in zip(exact.index, cells.index)])
    assert same > 0.9
    found = find_duplicates(X, [str(g).encode() for g in groups], threshold=0.9, nearest=cells)
    assert set(copies) <= set(zip(found.i.tolist(), found.j.tolist()))


def test_cell_pass_with_many_identical_photos_finds_what_the_exact_pass_finds():
    # 395 identical rows under 201 keys (blank frames, say) give identical centroids: each cell must still
    # search itself, and a pair seen from one side only must still reach both rows' neighbour lists.
    from retrain.audit import _cell_pass, _group_array, _unit_rows

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 16)).astype(np.float32)
    X[:395] = X[0]
    groups = [0] * 200 + list(range(1, 201))
    exact = nearest_neighbours(X, 10, groups=groups, threshold=0.99)
    gid = _group_array(groups, len(X))
    Z = _unit_rows(X, centre=True, rows=np.unique(gid, return_index=True)[1])
    want = set(zip(exact.pair_i.tolist(), exact.pair_j.tolist()))
    for seed in range(12):
        cells = _cell_pass(Z, gid, 10, 0.99, seed=seed)
        assert set(zip(cells.pair_i.tolist(), cells.pair_j.tolist())) == want
        np.testing.assert_array_equal(cells.valid, exact.valid)
        assert not cells.index[~cells.valid].any()  # index 0 where there is no neighbour, as documented


def test_one_pass_serves_label_issues_and_duplicates_as_separate_calls_do():
    X, y = blobs(n_per_class=30, spread=0.5)
    X[5] = X[40] + 0.001
    keys = [i.to_bytes(20, "big") for i in range(len(y))]
    keys[7] = keys[6]
    proba = np.random.default_rng(0).dirichlet(np.ones(3), len(y))
    nearest = nearest_neighbours(X, 10, groups=keys, threshold=0.9)
    a = rank_label_issues(proba, y, neighbours=10, nearest=nearest)
    b = rank_label_issues(proba, y, X=X, groups=keys, neighbours=10)
    np.testing.assert_allclose(a.score, b.score)
    assert np.array_equal(a.suggested, b.suggested)
    p, q = find_duplicates(X, keys, threshold=0.9, nearest=nearest), find_duplicates(X, keys, threshold=0.9)
    assert np.array_equal(p.i, q.i) and np.array_equal(p.j, q.j) and list(p.kind) == list(q.kind)
    assert {(5, 40), (6, 7)} <= set(zip(p.i.tolist(), p.j.tolist())) or {(5, 40), (6, 7)} <= set(
        zip(p.j.tolist(), p.i.tolist())
    )


def test_near_copies_of_alike_pictures_need_to_be_much_closer_than_their_neighbours():
    # 300 distinct "alike" pictures: features near an 8-dimensional subspace, so that many distinct pairs
    # are as similar as copies are elsewhere; and one copy of row 0 (a tiny change).
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 64)) + 0.05 * rng.normal(size=(300, 64))
    X = np.concatenate([X, X[:1] + 0.002 * rng.normal(size=(1, 64))]).astype(np.float32)
    keys = [i.to_bytes(20, "big") for i in range(301)]
    fixed_cut = find_duplicates(X, keys, threshold=0.8, ratio=None)
    assert len(fixed_cut) > 200  # a fixed cut calls hundreds of distinct pictures copies
    pairs = find_duplicates(X, keys)
    assert (0, 300) in set(zip(pairs.i.tolist(), pairs.j.tolist()))
    assert len(pairs) <= len(fixed_cut) / 20


def test_near_copies_in_a_folder_of_fewer_than_six_images_need_the_small_set_cut():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(4, 32)).astype(np.float32)
    X[3] = X[0] + 0.01 * rng.normal(size=32)  # near copy
    X[2] = 0.6 * X[1] + 0.4 * rng.normal(size=32)  # alike, not a copy (similarity ~0.8)
    keys = [i.to_bytes(20, "big") for i in range(4)]
    pairs = find_duplicates(X, keys)
    assert [(int(i), int(j), str(k)) for i, j, k in zip(pairs.i, pairs.j, pairs.kind)] == [(0, 3, "near")]


def test_a_solved_learning_curve_ends_at_the_solved_layers_accuracy():
    from retrain.logreg import fit_logistic, strength

    X, y = blobs(n_per_class=80, spread=3.0, d=32)
    fold = np.arange(len(y)) % 5
    curve = learning_curve(X, y, fold, n_classes=3, head_params={"steps": 300}, seeds=2, solved_c=1.0)
    assert curve.accuracy.shape == (2, 6) and np.all(np.isfinite(curve.accuracy))
    assert curve.accuracy.mean(axis=0)[-1] > curve.accuracy.mean(axis=0)[0]
    # The 100% point of seed 0 is the layer solved on every row outside fold 0, scored on fold 0.
    train, held = fold != 0, fold == 0
    W, b, _ = fit_logistic(X[train], y[train], n_classes=3, l2=strength(1.0, int(train.sum())))
    assert curve.accuracy[0, -1] == pytest.approx(
        ((X[held] @ W + b).argmax(axis=1) == y[held]).mean(), abs=0.02
    )
