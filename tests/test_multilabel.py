"""retrain --multi_label (issue 14): rows from folders and labels files, the sigmoid head, thresholds, metrics,
the exported model, label_image / the Python API / the HTTP API, and bad input. Tiny stand-in backbone."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import retrain
from conftest import TINY
from retrain.cli import label_image_main, retrain_main
from retrain.errors import ConfigError, RetrainError
from retrain.export import get_manifest
from retrain.mlhead import (
    SigmoidHead,
    average_precision,
    example_f1,
    fit_sigmoid_layers,
    label_f1_curve,
    multilabel_metrics,
    shared_f1_curve,
    threshold_grid,
    tune_thresholds,
)

LABELS = ("blue", "green", "red")
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def _photo(labels, rng) -> Image.Image:
    """A noisy dark image with each label's colour channel lit: a linear problem for the tiny backbone."""
    px = np.full((40, 40, 3), 40.0) + rng.normal(0, 20, (40, 40, 3))
    for name in labels:
        px[..., CHANNEL[name]] += 150
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


def _label_sets(n: int, seed: int = 0) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(seed)
    sets = [tuple(sorted(rng.choice(LABELS, size=rng.integers(1, 3), replace=False))) for _ in range(n)]
    sets[0] = LABELS  # one photo with every label
    return sets


def make_folder_set(root: Path, n: int = 48, seed: int = 0) -> list[tuple[str, ...]]:
    """Each photo saved once, then copied into the folder of each further label it carries."""
    rng = np.random.default_rng(seed)
    sets = _label_sets(n, seed)
    for i, labels in enumerate(sets):
        first = root / labels[0] / f"p{i:03d}.jpg"
        first.parent.mkdir(parents=True, exist_ok=True)
        _photo(labels, rng).save(first, quality=90)
        for other in labels[1:]:
            (root / other).mkdir(exist_ok=True)
            shutil.copy(first, root / other / f"p{i:03d}.jpg")
    return sets


def make_file_set(root: Path, n: int = 40, seed: int = 1) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(seed)
    sets = _label_sets(n, seed)
    (root / "img").mkdir(parents=True)
    for i, labels in enumerate(sets):
        _photo(labels, rng).save(root / "img" / f"c{i:03d}.jpg", quality=90)
    return sets


def _config(base: Path, name: str) -> dict:
    return dict(
        architecture=TINY,
        bottleneck_dir=str(base / "bottlenecks"),
        model_dir=str(base / "models"),
        output_dir=str(base / name),
        how_many_training_steps=300,
        eval_step_interval=100,
        seed=1,
        quiet=True,
    )


def _cli_flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ml")
    sets = make_folder_set(base / "images")
    result = retrain.train(base / "images", multi_label=True, quantize="fp16", **_config(base, "run"))
    return base, sets, result


# -- metrics and thresholds -------------------------------------------------------------------------
def test_average_precision_and_example_f1_by_hand():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(
        0.5
    )  # a tie counts once
    assert average_precision(np.array([0.1, 0.2]), np.array([0, 0])) is None
    pred = np.array([[1, 0], [0, 0], [1, 1]], bool)
    truth = np.array([[1, 1], [0, 0], [1, 1]], bool)
    assert example_f1(pred, truth) == pytest.approx((2 / 3 + 1 + 1) / 3)  # both empty: 1
    m = multilabel_metrics(pred.astype(np.float32), truth, np.full(2, 0.5), ["a", "b"])
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["per_label"]["b"] == {
        "ap": pytest.approx((1 + 2 / 3) / 2, abs=1e-6),  # the tie at 0 is one step
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3, abs=1e-6),
        "support": 2,
        "threshold": 0.5,
    }


def _two_labels(rng, n):
    """Label a: confident, well-separated scores; label b: its positives scored low (0.2-0.4), as a rare or
    hard label's are. Every image has at least one label."""
    truth = np.c_[rng.random(n) < 0.5, rng.random(n) < 0.4]
    truth[~truth.any(axis=1), 0] = True
    a = np.where(truth[:, 0], rng.uniform(0.8, 1, n), rng.uniform(0, 0.2, n))
    b = np.where(truth[:, 1], rng.uniform(0.2, 0.4, n), rng.uniform(0, 0.25, n))
    return np.c_[a, b].astype(np.float32), truth


def test_thresholds_stay_at_half_when_any_threshold_is_as_good():
    rng = np.random.default_rng(0)
    truth = np.c_[np.r_[np.ones(20, bool), np.zeros(80, bool)], np.r_[np.zeros(50, bool), np.ones(50, bool)]]
    sure = np.where(truth, rng.uniform(0.9, 1, truth.shape), rng.uniform(0, 0.1, truth.shape))
    thresholds, sources = tune_thresholds(sure, truth)
    # A flat top of the F1 curve: the point of it nearest 0.5, not one of its ends.
    assert thresholds == pytest.approx([0.5, 0.5], abs=1e-6) and sources == ["tuned", "tuned"]


def test_tuned_thresholds_beat_half_on_new_images():
    rng = np.random.default_rng(0)
    held, held_truth = _two_labels(rng, 300)
    thresholds, sources = tune_thresholds(held, held_truth)
    assert sources == ["tuned", "tuned"]
    assert 0.1 < thresholds[1] < 0.25  # b's comes down among its positives
    assert 0.2 < thresholds[0] < 0.8  # a's stays in the gap between its negatives and positives
    new, new_truth = _two_labels(rng, 2000)  # images the thresholds never saw
    assert example_f1(new >= thresholds, new_truth) > example_f1(new >= 0.5, new_truth) + 0.1


def test_a_label_with_few_positives_takes_the_shared_threshold_and_few_pull_toward_it():
    rng = np.random.default_rng(1)
    probs, truth = _two_labels(rng, 300)
    probs = np.c_[probs, np.where(np.arange(300) < 3, 0.3, 0.05)]
    truth = np.c_[truth, np.arange(300) < 3]
    thresholds, sources = tune_thresholds(probs, truth)
    assert sources == ["tuned", "tuned", "shared"]
    shared = thresholds[2]
    # With a huge weight on the shared threshold every tuned one is pulled onto it.
    pulled, _ = tune_thresholds(probs, truth, shrink=1e9)
    assert pulled == pytest.approx([shared] * 3, abs=1e-6)
    # No positives anywhere: 0.5 for all.
    assert tune_thresholds(probs, np.zeros_like(truth))[0].tolist() == [0.5] * 3


def test_f1_curves_are_the_example_f1_at_each_threshold():
    rng = np.random.default_rng(2)
    probs = rng.random((60, 3)).astype(np.float32)
    truth = rng.random((60, 3)) < 0.4
    others = np.array([0.3, 0.6, 0.5], np.float32)
    grid = threshold_grid()
    curve = label_f1_curve(probs, truth, others, 1, grid)
    for g, value in zip(grid[::10], curve[::10]):
        t = others.copy()
        t[1] = 1 / (1 + np.exp(-g))
        z = np.log(probs / (1 - probs))
        pred = probs >= t
        pred[:, 1] = z[:, 1] >= g
        assert value == pytest.approx(example_f1(pred, truth))
    shared = shared_f1_curve(probs, truth, grid)
    z = np.log(probs / (1 - probs))
    assert shared == pytest.approx([example_f1(z >= g, truth) for g in grid])


def test_layers_sharing_batches_never_learn_from_rows_that_are_not_theirs():
    # Feature 0 is non-zero only on rows 0-19, which job 0 does not have: its weight on feature 0 gets no
    # gradient at all (Adam leaves it where it started), while job 1, which has them, learns it.
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (200, 4)).astype(np.float32)
    X[:, 0] = 0
    X[:20, 0] = 3
    Y = np.c_[np.arange(200) < 20, rng.random(200) < 0.3]
    jobs = [(np.arange(20, 200), 0), (np.arange(200), 1)]
    start = fit_sigmoid_layers(X, Y, jobs, steps=1, learning_rate=1e-12)
    P = fit_sigmoid_layers(X, Y, jobs, steps=300, batch_size=20)
    assert np.array_equal(P[0, :, 0], start[0, :, 0])
    assert P[1, 0, 0] > 0.5
    # Both layers learn the second label from the rows they share.
    assert P[0, 1, 1:4] == pytest.approx(P[1, 1, 1:4], abs=0.5) and np.abs(P[0, 1, 1:4]).max() > 0.05


def test_sigmoid_head_learns_independent_labels_and_keeps_its_best_step():
    rng = np.random.default_rng(0)
    Y = rng.random((300, 3)) < 0.4
    X = (rng.normal(0, 1, (300, 8)) + 4.0 * np.c_[Y, np.zeros((300, 5))]).astype(np.float32)
    seen = []
    head = SigmoidHead(steps=200, seed=0).fit(
        X[:200], Y[:200], X_val=X[200:], Y_val=Y[200:], eval_every=50, on_eval=lambda r, h: seen.append(r)
    )
    assert [r.step for r in seen] == [50, 100, 150, 200]
    assert head.best_step_ == max(seen, key=lambda r: (r.validation_map, -r.validation_cross_entropy)).step
    probs = head.predict_proba(X[200:])
    assert probs.shape == (100, 3) and example_f1(probs >= 0.5, Y[200:]) > 0.85
    again = SigmoidHead(steps=200, seed=0).fit(X[:200], Y[:200], X_val=X[200:], Y_val=Y[200:], eval_every=50)
    np.testing.assert_array_equal(again.coef_, head.coef_)  # the seed makes it reproducible


# -- a run from folders -----------------------------------------------------------------------------
def test_folder_run_metrics_npz_and_manifest_follow_the_contract(folder_run):
    base, sets, result = folder_run
    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kind"] == "multi_label" and "test_accuracy" not in metrics
    assert metrics["image_count"] == len(sets)  # every copy folded into its photo's row
    assert metrics["copies_merged"] == sum(len(s) - 1 for s in sets)
    for part in ("validation", "test"):
        m = metrics["multi_label"][part]
        assert set(m) == {"mAP", "example_f1", "exact_match", "example_f1_at_0.5", "n_images", "per_label"}
        assert set(m["per_label"]) == set(LABELS)
        assert set(m["per_label"]["red"]) == {"ap", "precision", "recall", "f1", "support", "threshold"}
    assert metrics["multi_label"]["test"]["mAP"] > 0.9
    with np.load(run / "multilabel.npz") as z:
        assert (
            z["truth"].dtype == bool
            and z["probs"].dtype == np.float32
            and z["thresholds"].dtype == np.float32
        )
        assert list(z["labels"]) == list(LABELS) and z["truth"].shape == z["probs"].shape
        assert len(z["paths"]) == len(z["split"]) and "testing" in set(z["split"])
        assert len(set(z["paths"])) == len(z["paths"])  # no photo counted twice
    manifest = get_manifest(onnx.load(str(result.output_graph)))
    assert manifest["kind"] == "multi_label" and manifest["labels"] == list(LABELS)
    assert manifest["output"] == {"name": "final_result", "kind": "independent_probabilities"}
    assert len(manifest["thresholds"]) == 3 and manifest["thresholds"] == metrics["thresholds"]
    assert "unknown" not in manifest
    assert (run / "summaries").is_dir() and (run / "config.json").exists()


def test_copies_share_a_split(folder_run):
    base, sets, result = folder_run
    with np.load(result.run_dir / "multilabel.npz") as z:
        names = [Path(p).name for p in z["paths"]]
    assert len(names) == len(set(names))  # p007.jpg in red/ and blue/ is one row


def test_python_api_label_image_and_http_api_give_the_label_set(folder_run, capsys):
    base, sets, result = folder_run
    i = next(i for i, s in enumerate(sets) if len(s) == 2)
    photo = base / "images" / sets[i][0] / f"p{i:03d}.jpg"
    clf = retrain.load(result.output_graph)
    assert clf.multi_label and clf.thresholds.shape == (3,)
    (ranked,) = clf.classify([str(photo)])
    assert len(ranked) == 3 and ranked.labels == [
        p.label for p in ranked if p.score >= clf.thresholds[clf.labels.index(p.label)]
    ]
    assert set(ranked.labels) == set(sets[i])
    d = ranked.to_dict()
    assert set(d) == {"predictions", "labels"} and d["labels"] == ranked.labels
    assert label_image_main(["--graph", str(result.output_graph), "--json", "--image", str(photo)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["labels"] == ranked.labels and len(line["predictions"]) == 3
    assert label_image_main(["--graph", str(result.output_graph), "--top_k", "1", "--image", str(photo)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "labels: " + ", ".join(ranked.labels) and len(out) == 2
    fp16 = retrain.load(result.output_graph.with_name("output_graph.fp16.onnx"))
    assert fp16.multi_label and fp16.classify([str(photo)])[0].labels == ranked.labels

    from starlette.testclient import TestClient

    from retrain.serve import create_app

    with TestClient(create_app(result.output_graph)) as c:
        r = c.post("/v1/classify", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["labels"] == ranked.labels


def test_without_multi_label_the_copies_warning_suggests_it(tmp_path, caplog):
    make_folder_set(tmp_path / "images", n=12)
    with caplog.at_level(logging.WARNING, logger="retrain"):
        retrain.train(tmp_path / "images", no_report=True, **_config(tmp_path, "single"))
    assert any("--multi_label" in r.message and "same image is in" in r.message for r in caplog.records)


# -- a run from a labels file: formats and bad input ----------------------------------------------------
def _write_csv(path: Path, rows: list[str], *, bom: bool = False, crlf: bool = False) -> Path:
    text = ("\r\n" if crlf else "\n").join(["file,labels,sources", *rows]) + "\n"
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_labels_file_with_bom_crlf_duplicates_and_an_unreadable_photo(tmp_path, caplog):
    sets = make_file_set(tmp_path)
    rows = [f"c{i:03d}.jpg,{';'.join(s)},x" for i, s in enumerate(sets)]
    rows.append(rows[3])  # the same row twice: kept once
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    rows.append("broken.jpg,purple,x")  # a label whose only photo cannot be read
    (tmp_path / "img" / "extra.jpg").write_bytes((tmp_path / "img" / "c001.jpg").read_bytes())
    csv = _write_csv(tmp_path / "labels.csv", rows, bom=True, crlf=True)
    with caplog.at_level(logging.INFO, logger="retrain"):
        result = retrain.train(
            tmp_path / "img", labels_file=str(csv), multi_label_threshold=0.4, **_config(tmp_path, "run")
        )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "label 'purple' has no readable image; it is left out" in text
    assert "1 image file(s) under" in text and "not in --labels_file" in text
    assert "1 image(s) carry every label" in text
    assert result.labels == list(LABELS)
    manifest = get_manifest(onnx.load(str(result.output_graph)))
    assert manifest["thresholds"] == [0.4, 0.4, 0.4]
    assert result.metrics["image_count"] == len(sets)


def test_a_label_on_every_photo_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    sets = make_file_set(tmp_path, n=24)
    rows = [f"c{i:03d}.jpg,{';'.join(sorted({*s, 'red'}))},x" for i, s in enumerate(sets)]
    csv = _write_csv(tmp_path / "labels.csv", rows)
    with caplog.at_level(logging.INFO, logger="retrain"):
        result = retrain.train(tmp_path / "img", labels_file=str(csv), **_config(tmp_path, "run"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "label(s) 'red' are on every image: the model will always say them" in text
    assert result.metrics["kind"] == "multi_label" and (tmp_path / "run").is_dir()


def test_labels_file_problems_are_one_message_and_nothing_is_written(tmp_path, capsys):
    make_file_set(tmp_path, n=6)
    outside = tmp_path / "outside.jpg"
    shutil.copy(tmp_path / "img" / "c000.jpg", outside)
    csv = _write_csv(
        tmp_path / "bad.csv", ["c000.jpg,red,x", "../outside.jpg,red,x", "c001.jpg,,x", "nope.jpg,red,x"]
    )
    cfg = _config(tmp_path, "never")
    code = retrain_main(["--image_dir", str(tmp_path / "img"), "--labels_file", str(csv), *_cli_flags(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "line 3" in err and "outside --image_dir" in err and "line 4" in err and "line 5" in err
    assert not (tmp_path / "never").exists() and not (tmp_path / "bottlenecks").exists()


def test_refused_settings_exit_2_with_a_reason(tmp_path, capsys):
    make_folder_set(tmp_path / "images", n=6)
    base = ["--image_dir", str(tmp_path / "images"), *_cli_flags(_config(tmp_path, "never"))]
    assert retrain_main([*base, "--multi_label", "--fine_tune"]) == 2
    assert "fine-tuning is not available for multi-label models" in capsys.readouterr().err
    assert retrain_main([*base, "--multi_label", "--multi_label_threshold", "1.5"]) == 2
    assert "--multi_label_threshold" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError):
        retrain.train(tmp_path / "images", multi_label=True, resume=True, **_config(tmp_path, "never"))
    with pytest.raises(RetrainError, match="needs --image_dir"):
        retrain.train(labels_file=str(tmp_path / "x.csv"), **_config(tmp_path, "never"))


def test_distortions_class_weighting_and_final_fit_train(tmp_path, caplog):
    sets = make_file_set(tmp_path, n=30)
    csv = _write_csv(tmp_path / "labels.csv", [f"c{i:03d}.jpg,{';'.join(s)},x" for i, s in enumerate(sets)])
    with caplog.at_level(logging.INFO, logger="retrain"):
        result = retrain.train(
            tmp_path / "img",
            labels_file=str(csv),
            flip_left_right=True,
            distorted_copies=2,
            class_balance="weight",
            final_fit="train",
            **_config(tmp_path, "run"),
        )
    m = result.metrics
    assert "distortions" in m["seconds"] and m["final_fit"] == "train" and m["validation_kind"] == "held-out"
    assert "Distortions (" in caplog.text and "best validation mAP" in caplog.text
    assert m["multi_label"]["test"]["mAP"] > 0.8


def test_export_of_a_multi_label_model_compares_outputs_not_folder_accuracy(folder_run, tmp_path):
    from retrain.quantize import convert_file

    base, sets, result = folder_run
    photos = sorted(str(p) for p in (base / "images" / "red").glob("*.jpg"))[:4]
    report = convert_file(
        result.output_graph, "fp16", tmp_path / "m.onnx", eval_paths=photos, eval_labels=[2] * 4
    )
    assert report.comparison.accuracy is None and report.comparison.agreement == 1.0
    assert retrain.load(tmp_path / "m.onnx").multi_label


def test_cross_fit_keeps_the_fewest_steps_within_its_tolerance_of_the_best_map():
    from retrain.config import TrainConfig
    from retrain.multilabel import head_params, ml_cross_fit

    rng = np.random.default_rng(0)
    Y = rng.random((300, 3)) < 0.3
    X = (rng.normal(0, 1, (300, 16)) + Y @ rng.normal(0, 1, (3, 16)) * 0.3).astype(np.float32)
    params = {**head_params(TrainConfig(multi_label=True)), "steps": 400}
    exact = ml_cross_fit(X, Y, None, params=params, tolerance=0.0, patience=100)
    loose = ml_cross_fit(X, Y, None, params=params, tolerance=0.5, patience=100)
    top = max(exact.curve_map)
    assert exact.map == top
    assert loose.curve_map == exact.curve_map  # the same fits; only the choice differs
    first_near = min(s for s, m in zip(loose.curve_steps, loose.curve_map) if m >= top - 0.5 * (1 - top))
    assert loose.best_steps == first_near < exact.best_steps
