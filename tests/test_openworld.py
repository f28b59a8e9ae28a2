"""Calibrated confidence and the unknown score: the statistics, the graph output, and every way to read it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from PIL import Image

import retrain
from retrain.calibrate import fit_temperature, reliability, softmax
from retrain.crossfit import assign_folds
from retrain.openset import auroc, fit_stats, fit_unknown, leave_one_class_out, out_of_fold_scores


def blobs(n_per_class=40, n_classes=3, d=24, seed=0, spread=0.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(n_classes, d)) * 2
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = np.abs(centres[y] + spread * rng.normal(0, 1, size=(len(y), d))) + 0.1
    return X.astype(np.float32), y


# -- calibration --------------------------------------------------------------------------------------------
def test_temperature_recovers_the_scale_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(4000, 5))
    p = softmax(logits, 2.5)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)


def test_temperature_fixes_overconfidence_and_keeps_every_prediction():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size=(3000, 4))
    y = np.array([rng.choice(4, p=row) for row in softmax(logits)])
    hot = logits * 3  # an overconfident model: same ranking, logits too large
    t = fit_temperature(hot, y)
    assert t == pytest.approx(3, rel=0.15)
    before, after = reliability(softmax(hot), y), reliability(softmax(hot, t), y)
    assert before.ece > 0.1 and after.ece < 0.03
    assert np.array_equal(softmax(hot).argmax(1), softmax(hot, t).argmax(1))


def test_a_temperature_is_used_only_where_it_carries_over_to_rows_it_was_not_fitted_on():
    from retrain.calibrate import calibrate, carries_over

    # 60 rows of class 0, every fifth a confident error: the rows dealt to one fold hold all the errors, so a
    # temperature fitted on the other folds (no errors: sharpen) ruins that fold, and the others' the rest.
    y = np.zeros(60, np.int64)
    logits = np.tile([[4.0, 0.0, 0.0]], (60, 1))
    logits[::5] = [0.0, 4.0, 0.0]
    assert fit_temperature(logits, y) > 1.5 and not carries_over(logits, y)
    cal = calibrate(logits, y, fitted_on="out_of_fold")
    assert cal.temperature == 1.0 and cal.after["out_of_fold"].ece == cal.before["out_of_fold"].ece
    # The same errors spread over the folds: every fold agrees, and the temperature is used.
    spread = np.tile([[4.0, 0.0, 0.0]], (60, 1))
    spread[::6] = [0.0, 4.0, 0.0]
    assert carries_over(spread, y) and calibrate(spread, y, fitted_on="out_of_fold").temperature > 1.5
    # Overconfident logits: the temperature is used and the ECE falls.
    rng = np.random.default_rng(3)
    raw = rng.normal(0, 2, size=(500, 4))
    labels = np.array([rng.choice(4, p=row) for row in softmax(raw)])
    hot = calibrate(raw * 3, labels, fitted_on="out_of_fold")
    assert hot.temperature > 2 and hot.after["out_of_fold"].ece < hot.before["out_of_fold"].ece
    # One row a class: nothing to test a temperature on.
    assert not carries_over(raw[:4], np.arange(4))


def test_reliability_bins_by_hand():
    r = reliability(np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35]]), np.array([0, 1, 0]))
    # 0.9 -> bin 13 (0.867, 0.933], right; 0.6 and 0.65 -> bin 8 (0.533, 0.6] and bin 9 (0.6, 0.667]
    assert r.count[13] == 1 and r.count[8] == 1 and r.count[9] == 1 and r.count.sum() == 3
    assert r.ece == pytest.approx((0.1 + 0.6 + 0.35) / 3)
    d = r.to_dict()
    assert d["bins"] == 15 and len(d["edges"]) == 16 and d["accuracy"][0] is None  # empty bin
    json.dumps(d)  # JSON-ready: no NaN


def test_no_rows_means_no_temperature():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


# -- the unknown score ------------------------------------------------------------------------------------
def test_out_of_fold_scores_equal_fits_without_the_fold():
    X, y = blobs(n_per_class=30, d=16)
    fold = assign_folds(y, 4, seed=0)
    oof = out_of_fold_scores(X, y, fold, 3)
    for f in range(4):
        direct = fit_stats(X[fold != f], y[fold != f], 3).score(X[fold == f])
        assert np.allclose(oof[fold == f], direct, rtol=2e-3), f


def test_held_out_kinds_score_higher_than_known_ones():
    X, y = blobs(n_per_class=60, n_classes=4)
    stats = fit_stats(X[y < 3], y[y < 3], 3)
    known, new = stats.score(X[y < 3]), stats.score(X[y == 3])
    assert auroc(known, new) > 0.99
    loco = leave_one_class_out(X[::2], y[::2], X[1::2], y[1::2], 4)
    assert set(loco) == {0, 1, 2, 3} and min(loco.values()) > 0.95


def test_leave_one_class_out_downdate_equals_its_covariance_refactorised():
    """The fast path (one factorisation, a Woodbury downdate per class) gives the scores of the covariance it
    stands for, kappa (S - a R_c^T R_c), and AUROCs within a point of refitting each class's statistics."""
    from retrain.openset import _leave_one_class_out_scores, _Scatter, _shrunk_cov, _solve_scores, normalize

    X, y = blobs(n_per_class=50, n_classes=4, d=64, spread=1.5)  # 25 fitted rows a class <= D / 2
    Xk, yk = X[1::2], y[1::2]
    sc = _Scatter(normalize(X[::2], np.float32), y[::2], 4)
    fast = _leave_one_class_out_scores(sc, Xk, yk)
    exact = _leave_one_class_out_scores(sc, Xk, yk, exact=True)
    assert set(fast) == set(exact) == {0, 1, 2, 3}
    n, d = len(sc.y), X.shape[1]
    S, alpha = _shrunk_cov(sc.W, sc.sq, n - 4)
    a = (1 - alpha) / (n - 4)
    known_c = normalize(Xk, np.float32) - sc.center.astype(np.float32)
    for c in range(4):
        Rc = sc.R[sc.y == c]
        W_c = sc.W - Rc.T @ Rc
        mean_var = np.trace(W_c) / (n - len(Rc) - 3) / d
        cov = S - a * (Rc.T @ Rc)
        cov *= mean_var / (np.trace(cov) / d)
        rows = np.concatenate([known_c[yk != c], sc.Xc[sc.y == c], known_c[yk == c]])
        direct = _solve_scores(cov, sc.means[np.arange(4) != c], rows)
        assert np.allclose(np.concatenate(fast[c]), direct, rtol=1e-3), c
        assert abs(auroc(*fast[c]) - auroc(*exact[c])) < 0.01, c
    # Classes of one image (no spread left without them) take the exact path: finite scores, no crash.
    X1, y1 = np.concatenate([X[:2], X[y == 2][:30]]), np.r_[0, 1, np.full(30, 2)]
    y1[0], y1[1] = 0, 1
    model = fit_unknown(
        X1, y1, np.arange(len(y1)) % 3, labels=list("abc"), X_test=X1[::4] + 0.01, y_test=y1[::4]
    )
    assert model.loco_auroc and all(np.isfinite(v) for v in model.loco_auroc.values())
    rows = np.tile(X[:3], (4, 1))  # every class: copies of one image, no spread anywhere
    flat = fit_unknown(
        rows,
        np.tile([0, 1, 2], 4),
        np.arange(12) % 3,
        labels=list("abc"),
        X_test=rows,
        y_test=np.tile([0, 1, 2], 4),
    )
    assert np.isfinite(flat.threshold) and all(np.isfinite(v) for v in flat.loco_auroc.values())


def test_leave_one_class_out_compares_capped_evenly_spaced_rows():
    from retrain.openset import LOCO_MAX_KNOWN, LOCO_MAX_UNKNOWN, loco_rows

    y_fit = np.repeat([0, 1], [3 * LOCO_MAX_UNKNOWN, 10])
    y_known = np.repeat([0, 1, 2], [5, LOCO_MAX_KNOWN, LOCO_MAX_KNOWN])
    known, fit, known_c = loco_rows(y_fit, y_known, 0)
    assert len(known) == LOCO_MAX_KNOWN and len(np.unique(known)) == LOCO_MAX_KNOWN
    assert set(y_known[known]) == {1, 2}  # spread over the other classes, not the first rows
    assert len(fit) == LOCO_MAX_UNKNOWN and fit[0] == 0 and fit[-1] == 3 * LOCO_MAX_UNKNOWN - 1
    assert list(known_c) == [0, 1, 2, 3, 4]  # the left-out class's known rows: every one
    small = loco_rows(y_fit, y_known, 1)
    assert list(small[1]) == list(range(3 * LOCO_MAX_UNKNOWN, 3 * LOCO_MAX_UNKNOWN + 10))


def test_random_features_give_chance_auroc():
    # The must-fail case: "unknown" rows drawn from the same distribution as the known ones.
    rng = np.random.default_rng(2)
    X = np.abs(rng.normal(size=(600, 32))).astype(np.float32)
    y = rng.integers(0, 3, 600)
    stats = fit_stats(X[:400], y[:400], 3)
    assert abs(auroc(stats.score(X[400:500]), stats.score(X[500:])) - 0.5) < 0.12


def test_threshold_accepts_95_percent_of_known_held_out_images():
    X, y = blobs(n_per_class=200, n_classes=3, d=16, spread=1.0)
    fold = assign_folds(y, 5, seed=0)
    model = fit_unknown(X[::2], y[::2], fold[::2], labels=["a", "b", "c"], X_test=X[1::2], y_test=y[1::2])
    assert model.known_rejected == pytest.approx(0.05, abs=0.01)
    new_known = model.score(X[1::2], None)  # never fitted on: about 5% above the threshold
    assert (new_known > model.threshold).mean() < 0.1
    fixed = fit_unknown(X, y, fold, labels=["a", "b", "c"], threshold=123.0)
    assert fixed.threshold == 123.0 and fixed.rule == "--unknown_threshold"


def test_two_classes_and_a_one_image_class_still_get_scores():
    X, y = blobs(n_per_class=20, n_classes=2)
    one = np.abs(np.random.default_rng(5).normal(size=(1, X.shape[1]))).astype(np.float32) + 3
    X2, y2 = np.concatenate([X, one]), np.r_[y, 2]
    fold = assign_folds(y2, 5, seed=0)
    for Xs, ys, labels in ((X, y, ["a", "b"]), (X2, y2, ["a", "b", "lonely"])):
        model = fit_unknown(
            Xs, ys, assign_folds(ys, 5, seed=0), labels=labels, X_test=Xs[::3], y_test=ys[::3]
        )
        assert np.isfinite(model.threshold) and np.all(np.isfinite(model.stats.score(Xs)))
        assert set(model.loco_auroc) <= set(labels) and model.loco_auroc
    del fold
    # every class a single image: no spread to estimate, the score falls back to plain distance
    lone = fit_unknown(X[:3], np.arange(3), np.arange(3), labels=["a", "b", "c"])
    assert np.all(np.isfinite(lone.stats.score(X)))


def test_fitting_10000_cached_images_takes_a_few_seconds():
    rng = np.random.default_rng(0)
    n, d, classes = 10_000, 1280, 10
    y = rng.integers(0, classes, n)
    X = np.abs(rng.normal(0, 1, (classes, d))[y] + rng.normal(0, 2, (n, d))).astype(np.float32)
    logits = rng.normal(0, 3, (n, classes))
    t0 = time.process_time()
    fit_temperature(logits, y)
    model = fit_unknown(
        X[1000:],
        y[1000:],
        assign_folds(y[1000:], 5),
        labels=[str(c) for c in range(classes)],
        X_test=X[:1000],
        y_test=y[:1000],
    )
    cpu = time.process_time() - t0
    assert len(model.loco_auroc) == classes
    assert cpu < 6, f"{cpu:.1f} CPU seconds (one BLAS thread; about 2.5 on a loaded 2-core machine)"


def test_leave_one_class_out_layers_are_batched_and_capped_in_steps(monkeypatch):
    """The energy term's left-out layers: one batched loop, one layer per class, at most LOCO_MAX_STEPS steps
    (the final layer's 4,000 would cost 20x more for an AUROC within a point or so), scored only at the
    end, and still a sensible estimate."""
    import retrain.crossfit as crossfit
    import retrain.openworld as ow

    calls = []
    real = crossfit.fit_and_score_many

    def recording(X, y, jobs, **kw):
        calls.append((len(jobs), kw["head_params"]["steps"], list(kw.get("score_at") or [])))
        return real(X, y, jobs, **kw)

    monkeypatch.setattr(crossfit, "fit_and_score_many", recording)
    X, y = blobs(n_per_class=40, n_classes=4, d=16)
    test = np.arange(len(y)) % 5 == 0
    fold = assign_folds(y[~test], 5, seed=0)
    coef = np.zeros((16, 4), np.float32)
    result = ow.fit_open_world(
        labels=list("abcd"),
        X_fit=X[~test],
        y_fit=y[~test],
        held_out_logits=np.zeros((int((~test).sum()), 4)),
        held_out_rows=np.arange(int((~test).sum())),
        fold=fold,
        held_out_name="out_of_fold",
        coef=coef,
        intercept=np.zeros(4, np.float32),
        X_test=X[test],
        y_test=y[test],
        head_params={"steps": 4000},
    )
    assert calls == [(4, ow.LOCO_MAX_STEPS, [ow.LOCO_MAX_STEPS])]
    assert min(result.unknown.loco_auroc.values()) > 0.9


def test_the_solved_layers_left_out_layers_are_solved_not_stepped(monkeypatch):
    """With the L-BFGS final layer (solved_c), each left-out class's layer is solved at the same C, warm-started
    from the tested layer: no stepped layer is trained, and the estimate is as sensible."""
    import retrain.crossfit as crossfit
    import retrain.openworld as ow
    from retrain.logreg import fit_logistic

    def no_steps(*args, **kw):
        raise AssertionError("a stepped layer was trained")

    monkeypatch.setattr(crossfit, "fit_and_score_many", no_steps)
    X, y = blobs(n_per_class=40, n_classes=4, d=16)
    test = np.arange(len(y)) % 5 == 0
    fold = assign_folds(y[~test], 5, seed=0)
    W, b, _ = fit_logistic(X[~test], y[~test], n_classes=4, l2=1.0 / int((~test).sum()))
    result = ow.fit_open_world(
        labels=list("abcd"),
        X_fit=X[~test],
        y_fit=y[~test],
        held_out_logits=X[~test] @ W + b,
        held_out_rows=np.arange(int((~test).sum())),
        fold=fold,
        held_out_name="out_of_fold",
        coef=W,
        intercept=b,
        X_test=X[test],
        y_test=y[test],
        head_params={"steps": 4000},
        solved_c=1.0,
    )
    assert set(result.unknown.loco_auroc) == set("abcd")
    assert min(result.unknown.loco_auroc.values()) > 0.9


# -- through a real run, the model file and every reader -------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _solid(path, colour, seed):
    rng = np.random.default_rng(seed)
    px = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(px).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import TINY, make_image_folder

    root = tmp_path_factory.mktemp("ow")
    images = make_image_folder(root / "images", per_class=20)
    result = retrain.train(
        images,
        architecture=TINY,
        bottleneck_dir=str(root / "b"),
        model_dir=str(root / "m"),
        output_dir=str(root / "out"),
        how_many_training_steps=300,
        eval_step_interval=100,
        seed=1,
        quiet=True,
    )
    odd = [_solid(root / f"yellow{i}.jpg", (230, 230, 30), i) for i in range(4)]
    odd += [_solid(root / f"grey{i}.jpg", (128, 128, 128), i) for i in range(4)]
    return result, images, odd, root


def test_run_reports_calibration_and_unknown_numbers(run):
    result, _, _, _ = run
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    cal = metrics["calibration"]
    # The default layer is fitted as the cross-fit's folds were (training + validation): the
    # out-of-fold logits choose T.
    assert cal["method"] == "temperature" and cal["temperature"] > 0 and cal["fitted_on"] == "out_of_fold"
    assert set(cal["ece_before"]) == {"out_of_fold", "test"} and set(cal["ece_after"]) == {
        "out_of_fold",
        "test",
    }
    diagram = cal["reliability"]["test"]["after"]
    assert diagram["bins"] == 15 and sum(diagram["count"]) == result.test_count
    unk = metrics["unknown"]
    assert unk["method"] == "mahalanobis+energy" and np.isfinite(unk["threshold"]) and "95%" in unk["rule"]
    assert unk["combination"]["energy_spread"] is not None  # held-out logits scaled the energy term
    assert set(unk["leave_one_class_out_auroc"]) == {"red", "green", "blue"}
    assert 0 <= unk["test_called_unknown"] <= 1 and unk["leave_one_class_out_auroc_mean"] > 0.5
    manifest = retrain.load(result.output_graph).manifest
    assert manifest["calibration"]["temperature"] == pytest.approx(cal["temperature"])
    assert manifest["unknown"]["threshold"] == pytest.approx(unk["threshold"])


def test_graph_score_equals_the_fitted_statistics_and_flags_odd_colours(run):
    result, images, odd, _ = run
    clf = retrain.load(result.output_graph)
    assert clf.has_unknown and clf.unknown_note is None
    known = sorted(images.rglob("*.jpg"))
    ranked = clf.classify([str(p) for p in known] + [str(p) for p in odd], top_k=3)
    scores = np.array([r.unknown_score for r in ranked])
    assert all(isinstance(r.unknown, bool) for r in ranked)
    assert [r[0].label for r in ranked[: len(known)]] == [p.parent.name for p in known]
    # Odd colours are farther from every class than any trained image
    assert auroc(scores[: len(known)], scores[len(known) :]) > 0.95
    assert all(r.unknown for r in ranked[len(known) :])


def test_temperature_off_leaves_probabilities_raw(run, tmp_path):
    from conftest import TINY

    result, images, _, root = run
    raw = retrain.train(
        images,
        architecture=TINY,
        bottleneck_dir=str(root / "b"),
        model_dir=str(root / "m"),
        output_dir=str(tmp_path / "raw"),
        how_many_training_steps=300,
        eval_step_interval=100,
        seed=1,
        quiet=True,
        calibration="none",
        unknown_threshold=-1e9,
    )
    clf_raw, clf_cal = retrain.load(raw.output_graph), retrain.load(result.output_graph)
    assert clf_raw.manifest["calibration"]["temperature"] == 1.0
    photos = [str(p) for p in sorted(images.rglob("*.jpg"))[::5]]
    a, b = clf_raw.classify(photos, top_k=None), clf_cal.classify(photos, top_k=None)
    assert [r[0].label for r in a] == [r[0].label for r in b]  # same top-1 with and without
    t = clf_cal.manifest["calibration"]["temperature"]
    if abs(t - 1) > 0.05:
        assert not np.allclose([r[0].score for r in a], [r[0].score for r in b], atol=1e-4)
    assert all(r.unknown for r in a)  # --unknown_threshold -1e9: everything is unknown


def _label_image(*args):
    cmd = [
        sys.executable,
        "-c",
        "import sys; from retrain.cli import label_image_main; sys.exit(label_image_main())",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_label_image_json_and_text_say_unknown(run):
    result, images, odd, _ = run
    photo = sorted((images / "red").glob("*.jpg"))[0]
    out = _label_image("--graph", result.output_graph, "--image", photo, odd[0], "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["unknown"] for line in lines] == [False, True]
    assert all(isinstance(line["unknown_score"], float) for line in lines)
    assert lines[0]["predictions"][0]["label"] == "red"
    text = _label_image("--graph", result.output_graph, "--image", odd[0])
    assert text.stdout.startswith("unknown (score ") and "closest: " in text.stdout.splitlines()[0]
    never = _label_image(
        "--graph", result.output_graph, "--image", odd[0], "--unknown_threshold", "1e9", "--json"
    )
    assert json.loads(never.stdout)["unknown"] is False


def test_old_model_without_the_output_still_classifies(run, tmp_path):
    result, images, _, _ = run
    model = onnx.load(str(result.output_graph))
    keep = [o for o in model.graph.output if o.name != "unknown_score"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    clf = retrain.load(old)
    assert not clf.has_unknown and "no unknown_score" in clf.unknown_note
    (ranked,) = clf.classify(str(sorted((images / "blue").glob("*.jpg"))[0]))
    assert ranked[0].label == "blue" and ranked.unknown_score is None and ranked.unknown is None
    out = _label_image("--graph", old, "--image", images / "green", "--json")
    assert out.returncode == 0
    assert all("unknown" not in json.loads(line) for line in out.stdout.splitlines())
    assert out.stderr.count("no unknown_score") == 1  # said once, not per image


def test_http_api_carries_the_same_fields(run):
    from starlette.testclient import TestClient

    from retrain.serve import create_app

    result, images, odd, _ = run
    clf = retrain.load(result.output_graph)
    with TestClient(create_app(result.output_graph)) as client:
        info = client.get("/v1/model").json()
        assert info["unknown"]["threshold"] == pytest.approx(clf.unknown_threshold)
        body = client.post(
            "/v1/classify", files=[("file", ("odd.jpg", odd[0].read_bytes(), "image/jpeg"))]
        ).json()
    (res,) = body["results"]
    (local,) = clf.classify(str(odd[0]))
    assert res["unknown"] is True and res["unknown_score"] == pytest.approx(local.unknown_score, rel=1e-5)
    assert res["predictions"][0]["label"] == local[0].label


def test_exported_graph_computes_exactly_the_python_score(tmp_path):
    from conftest import TINY
    from retrain.backbones import get_backbone
    from retrain.engines import OnnxEngine
    from retrain.export import backbone_onnx_path, build_classifier, make_manifest
    from retrain.openset import energy

    spec = get_backbone(TINY)
    backbone = backbone_onnx_path(spec, tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    pixels[:20, ..., 0] = 250  # three kinds of image, so that the classes differ
    pixels[20:40, ..., 1] = 250
    X = OnnxEngine(str(backbone))(pixels)  # (60, 16) features from the backbone alone
    y = np.repeat([0, 1, 2], 20)
    coef = rng.normal(0, 1, (16, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    t = 1.7
    logits = (X @ coef + b) / t
    model = fit_unknown(
        X, y, assign_folds(y, 4), labels=["r", "g", "x"], held_out_logits=logits, held_out_rows=np.arange(60)
    )
    graph = build_classifier(
        backbone, coef, b, make_manifest(spec, ["r", "g", "x"]), temperature=t, unknown=model
    )
    probs, score = OnnxEngine(graph.SerializeToString()).session.run(None, {"image": pixels})
    assert np.allclose(probs, softmax(logits), atol=1e-5)  # the temperature is in the graph
    assert np.allclose(score, model.score(X, logits), rtol=1e-4, atol=1e-4)
    assert np.allclose(model.score(X, logits), model.combination(model.stats.score(X), energy(logits)))
