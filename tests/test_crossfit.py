"""Out-of-fold fits: folds keep groups whole and classes spread, and no row is scored by a layer that saw it."""

import numpy as np
import pytest

from retrain.crossfit import assign_folds, checkpoint_steps, cross_fit, fit_and_score_many


def blobs(n_per_class=30, n_classes=3, d=16, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(n_classes, d))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(0, 1, size=(len(y), d))
    return X.astype(np.float32), y


def test_folds_are_stratified_balanced_and_deterministic():
    y = np.repeat([0, 1, 2], [50, 20, 7])
    fold = assign_folds(y, 5, seed=3)
    assert set(fold) == set(range(5))
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1
    for c in (0, 1):
        per = np.bincount(fold[y == c], minlength=5)
        assert per.max() - per.min() <= 1
    assert np.array_equal(fold, assign_folds(y, 5, seed=3))
    assert not np.array_equal(fold, assign_folds(y, 5, seed=4))


def test_groups_share_a_fold():
    y = np.repeat([0, 1], 20)
    groups = [i // 4 for i in range(40)]  # 10 groups of 4 rows
    fold = assign_folds(y, 5, groups=groups, seed=0)
    for g in range(10):
        assert len(set(fold[np.array(groups) == g])) == 1


def test_checkpoint_steps_end_at_the_full_count():
    marks = checkpoint_steps(4000)
    assert marks[0] == 40 and marks[-1] == 4000 and len(marks) == 20 and np.all(np.diff(marks) > 0)
    assert list(checkpoint_steps(7)) == [1, 2, 3, 4, 5, 6, 7]
    assert list(checkpoint_steps(45, 20))[-1] == 45


def test_out_of_fold_accuracy_is_high_on_separable_data():
    X, y = blobs()
    cf = cross_fit(X, y, n_classes=3, head_params={"steps": 200}, folds=5, seed=0)
    assert cf.logits.shape == (90, 3) and cf.fold.shape == (90,)
    assert cf.accuracy > 0.95
    assert np.allclose(cf.proba.sum(axis=1), 1, atol=1e-5)
    assert cf.best_steps in cf.curve_steps


def test_random_labels_stay_near_chance_out_of_fold():
    # A layer that saw a row would fit its random label; out-of-fold it cannot.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 64)).astype(np.float32)
    y = rng.integers(0, 3, size=120)
    cf = cross_fit(X, y, n_classes=3, head_params={"steps": 300}, folds=4, seed=0)
    final = (cf.logits.argmax(1) == y).mean()
    assert final < 0.55  # chance is 1/3; a layer scoring its own rows reaches ~100% here


def test_copies_of_a_row_never_vouch_for_it():
    # Every row appears twice with a random label. Without groups, a copy sits in the training folds and
    # the layer memorises it; with the copies grouped, out-of-fold accuracy falls back to chance.
    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 64)).astype(np.float32)
    y = rng.integers(0, 2, size=60)
    X2, y2, groups = np.concatenate([X, X]), np.concatenate([y, y]), list(range(60)) * 2
    # Every checkpoint is scored (no early stop): memorising takes steps, and the stop rule is not under test.
    full = {"head_params": {"steps": 300}, "folds": 5, "seed": 0, "patience": 20}
    leaky = cross_fit(X2, y2, n_classes=2, **full)
    grouped = cross_fit(X2, y2, n_classes=2, groups=groups, **full)
    assert (leaky.logits.argmax(1) == y2).mean() > 0.9
    assert (grouped.logits.argmax(1) == y2).mean() < 0.75


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        cross_fit(np.zeros((1, 4), np.float32), np.array([0]), n_classes=2, head_params={"steps": 10})


def test_fits_stop_once_more_steps_no_longer_help():
    # Overlapping classes in many dimensions: past some point more steps only overfit.
    X, y = blobs(n_per_class=20, d=256, spread=3.0)
    cf = cross_fit(X, y, n_classes=3, head_params={"steps": 4000}, folds=5, seed=0, patience=3)
    assert len(cf.curve_steps) < 20 and cf.best_steps < 4000
    assert len(cf.curve_accuracy) == len(cf.curve_loss) == len(cf.curve_steps)
    best = list(cf.curve_steps).index(cf.best_steps)
    assert len(cf.curve_steps) - 1 - best == 3  # stopped exactly `patience` checkpoints after the best


def test_gains_within_the_tolerance_do_not_move_the_best_point_or_keep_the_fits_going():
    # Overlapping classes: out-of-fold accuracy moves by a row or two between checkpoints. With a tolerance
    # of 15 rows (5%) those gains count for nothing, so the fits stop sooner, at an earlier best.
    X, y = blobs(n_per_class=100, d=64, spread=3.0, seed=3)
    strict = cross_fit(X, y, n_classes=3, head_params={"steps": 4000}, seed=0, patience=3, tolerance=0.0)
    loose = cross_fit(X, y, n_classes=3, head_params={"steps": 4000}, seed=0, patience=3, tolerance=0.05)
    assert loose.best_steps < strict.best_steps and len(loose.curve_steps) < len(strict.curve_steps)
    best = list(loose.curve_steps).index(loose.best_steps)
    assert len(loose.curve_steps) - 1 - best == 3
    # Nothing after the chosen point beat it by more than the tolerance.
    assert loose.curve_accuracy[best + 1 :].max() <= loose.accuracy + 0.05


def test_fold_fits_follow_the_head_they_stand_for():
    # The batched fold fits run SoftmaxHead's algorithm: a single-job fit scores like a SoftmaxHead fit.
    from retrain.crossfit import fit_and_score
    from retrain.head import SoftmaxHead

    X, y = blobs(n_per_class=40, spread=1.5, seed=4)
    train, score = np.arange(0, 120, 2), np.arange(1, 120, 2)
    marks, logits = fit_and_score(X, y, train, score, n_classes=3, head_params={"steps": 300}, seed=5)
    ours = (logits[-1].argmax(1) == y[score]).mean()
    head = SoftmaxHead(steps=300, seed=5, keep_best=False).fit(X[train], y[train], n_classes=3)
    theirs = (head.predict(X[score]) == y[score]).mean()
    assert marks[-1] == 300 and abs(ours - theirs) < 0.1


def test_a_weight_decay_grid_fits_each_value_as_its_own_run_would():
    # One batched loop over G decays x M jobs gives, for each decay, what a loop at that decay alone gives.
    from retrain.crossfit import fit_and_score_many

    X, y = blobs(n_per_class=30, spread=1.0, seed=2)
    jobs = [(np.arange(0, 90, 2), np.arange(1, 90, 2), 7), (np.arange(1, 90, 2), np.arange(0, 90, 2), 8)]
    params = {"steps": 120}
    marks, both = fit_and_score_many(X, y, jobs, n_classes=3, head_params=params, weight_decays=[0.0, 0.3])
    assert len(both) == 4
    for g, decay in enumerate((0.0, 0.3)):
        _, alone = fit_and_score_many(X, y, jobs, n_classes=3, head_params={**params, "weight_decay": decay})
        for m in range(2):
            np.testing.assert_allclose(both[g * 2 + m], alone[m], rtol=1e-4, atol=1e-5)
    assert not np.allclose(both[0], both[2])  # the decay changed the fit


def test_cross_fit_chooses_the_weight_decay_and_says_what_each_scored():
    X, y = blobs(n_per_class=30, spread=1.2, seed=6)
    cf = cross_fit(X, y, n_classes=3, head_params={"steps": 300}, folds=5, seed=0, weight_decays=[0.0, 50.0])
    # A decay of 50 leaves the layer almost no weights: worse out of fold, so not chosen.
    assert cf.weight_decay == 0.0 and set(cf.decay_accuracy) == {0.0, 50.0}
    assert cf.decay_accuracy[0.0] == cf.accuracy == max(cf.decay_accuracy.values()) > cf.decay_accuracy[50.0]
    # The logits are those of the chosen point: the same as a cross-fit at that decay alone.
    alone = cross_fit(X, y, n_classes=3, head_params={"steps": 300}, folds=5, seed=0, weight_decays=[0.0])
    assert alone.best_steps == cf.best_steps
    np.testing.assert_allclose(alone.logits, cf.logits, rtol=1e-4, atol=1e-5)


def test_score_at_scores_only_the_steps_asked_for_with_the_same_fit():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.arange(60) % 3
    job = [(np.arange(40), np.arange(40, 60), 1)]
    marks, (full,) = fit_and_score_many(X, y, job, n_classes=3, head_params={"steps": 50})
    end, (last,) = fit_and_score_many(X, y, job, n_classes=3, head_params={"steps": 50}, score_at=[50])
    assert list(end) == [50] and last.shape == (1, 20, 3)
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-6)


def test_two_threads_fit_exactly_what_one_thread_fits(monkeypatch):
    # The fold layers are split between threads; each layer's arithmetic is unchanged, so are its scores.
    import retrain.crossfit as crossfit

    X, y = blobs(n_per_class=40, d=32, spread=2.0, seed=6)
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(crossfit, "_fit_threads", lambda layers, work, n=threads: n)
        runs.append(
            cross_fit(X, y, n_classes=3, head_params={"steps": 200}, seed=1, weight_decays=[0.0, 0.1])
        )
    assert np.array_equal(runs[0].logits, runs[1].logits) and runs[0].best_steps == runs[1].best_steps
    assert np.array_equal(runs[0].curve_accuracy, runs[1].curve_accuracy)
