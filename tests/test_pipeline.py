"""The whole pipeline on generated images with the tiny stand-in backbone: outputs, metadata, repeatability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import retrain
from conftest import TINY
from retrain.export import get_manifest


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {
        t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("final_")
    }


def test_outputs_metadata_and_tensorboard(colour_dir: Path, fast_config: dict, tmp_path: Path):
    # Exact steps (retrain.py's way): in the default mode the cross-fit chooses them, and on these three
    # well separated colours it stops at its first checkpoint, long before an intermediate model at step 100.
    result = retrain.train(
        colour_dir,
        **fast_config,
        final_fit="train",
        saved_model_dir=str(tmp_path / "serving"),
        intermediate_store_frequency=100,
        summaries_dir=str(tmp_path / "tb"),
    )
    assert result.labels == ["blue", "green", "red"] and result.test_accuracy == 1.0
    manifest = get_manifest(onnx.load(str(result.output_graph)))
    assert manifest["labels"] == result.labels
    assert manifest["preprocessing"]["input_size"] == 32 and manifest["preprocessing"]["mean"] == [127.0] * 3
    assert manifest["backbone"]["name"] == "tiny_test_backbone"
    assert manifest["output"]["name"] == "final_result" and manifest["input"]["layout"] == "NHWC"
    assert manifest["metrics"]["test_accuracy"] == 1.0
    assert (tmp_path / "out" / "intermediate" / "intermediate_100.onnx").exists()
    assert json.loads((tmp_path / "serving" / "manifest.json").read_text())["labels"] == result.labels
    assert json.loads((tmp_path / "out" / "config.json").read_text())["how_many_training_steps"] == 200
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    for run, tags in (
        ("train", {"accuracy", "cross_entropy"}),
        ("validation", {"accuracy", "cross_entropy"}),
    ):
        acc = ea.EventAccumulator(str(tmp_path / "tb" / run))
        acc.Reload()
        assert tags <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("accuracy")][-1] == 200
    acc = ea.EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"final_retrain_ops/weights", "final_retrain_ops/biases"} <= set(acc.Tags()["histograms"])
    # A second run into the same summaries_dir keeps the first run's files.
    retrain.train(
        colour_dir,
        **{**fast_config, "output_dir": str(tmp_path / "out2")},
        final_fit="train",
        summaries_dir=str(tmp_path / "tb"),
    )
    assert len(list((tmp_path / "tb" / "train").glob("events.*"))) == 1
    assert len(list((tmp_path / "tb").glob("run-*/train/events.*"))) == 1


def test_exported_model_equals_the_lbfgs_layer_on_cached_features(colour_dir: Path, fast_config: dict):
    # The default layer: an L2-regularised logistic regression on training + validation at the C the
    # cross-fit chose, solved deterministically. No temperature: the exported layer is exactly the solution.
    from retrain.crossfit import C_GRID
    from retrain.logreg import LogisticHead

    result = retrain.train(colour_dir, **fast_config, calibration="none", final_fit="train+val")
    m = result.metrics
    assert m["head_solver"] == "lbfgs" and m["best_step"] is None and m["crossfit"]["C"] in C_GRID
    dataset = retrain.discover(colour_dir)
    features = retrain.extract_features(
        dataset,
        architecture=TINY,
        bottleneck_dir=fast_config["bottleneck_dir"],
        model_dir=fast_config["model_dir"],
    )
    splits = retrain.split_features(dataset, features)
    labelled = splits.train + splits.validation
    assert m["weight_decay"] == pytest.approx(1 / (m["crossfit"]["C"] * len(labelled.y)))
    head = LogisticHead(l2=m["weight_decay"]).fit(labelled.X, labelled.y, n_classes=3)
    exported = _weights(result.output_graph)
    assert np.array_equal(exported["final_retrain_ops/weights"], head.coef_)
    assert np.array_equal(exported["final_retrain_ops/biases"], head.intercept_)
    clf = retrain.load(result.output_graph)
    got = np.array(
        [
            [r.score for r in sorted(ranked, key=lambda r: r.label)]
            for ranked in clf.classify(splits.test.paths)
        ]
    )
    assert np.allclose(got, head.predict_proba(splits.test.X), atol=1e-4)


def test_exported_model_equals_the_head_on_cached_features(colour_dir: Path, fast_config: dict):
    # Few steps: probabilities well away from 0 and 1, so the comparison below sees the head's numbers.
    # No temperature: the exported layer is then exactly the head's (calibration divides it by T).
    cfg = {
        **fast_config,
        "how_many_training_steps": 4,
        "eval_step_interval": 2,
        "calibration": "none",
        "head_solver": "steps",
        "final_fit": "train+val",
    }
    result = retrain.train(colour_dir, **cfg)
    # train()'s steps by hand, on the features it cached: the same head, bit for bit.
    dataset = retrain.discover(colour_dir)
    features = retrain.extract_features(
        dataset, architecture=TINY, bottleneck_dir=cfg["bottleneck_dir"], model_dir=cfg["model_dir"]
    )
    assert features.computed == 0 and features.cached == 36
    splits = retrain.split_features(dataset, features)
    # The default final fit: training + validation, for the steps the cross-fit chose.
    labelled = splits.train + splits.validation
    steps = result.metrics["best_step"]
    assert steps == result.cross_fit.best_steps <= 4
    head = retrain.SoftmaxHead(steps=steps, seed=cfg["seed"]).fit(
        labelled.X, labelled.y, n_classes=3, eval_every=2
    )
    exported = _weights(result.output_graph)
    assert np.array_equal(exported["final_retrain_ops/weights"], head.coef_)
    assert np.array_equal(exported["final_retrain_ops/biases"], head.intercept_)
    # The exported graph, from pixels, gives that head's probabilities on the cached features.
    clf = retrain.load(result.output_graph)
    paths = [r.path for r in dataset.records]
    got = clf.predict_proba(np.stack([clf.to_pixels(p) for p in paths]))  # (36, 3)
    want = head.predict_proba(features.matrix(paths))
    assert 0.05 < want.min() and want.max() < 0.95, want  # not saturated
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert list(got.argmax(1)) == list(head.predict(features.matrix(paths)))


def test_same_seed_gives_the_same_model_bit_for_bit(colour_dir: Path, fast_config: dict, tmp_path: Path):
    a = retrain.train(colour_dir, **fast_config)
    b = retrain.train(colour_dir, **{**fast_config, "output_dir": str(tmp_path / "again")})
    c = retrain.train(colour_dir, **{**fast_config, "output_dir": str(tmp_path / "other"), "seed": 2})
    wa, wb, wc = _weights(a.output_graph), _weights(b.output_graph), _weights(c.output_graph)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not all(np.array_equal(wa[k], wc[k]) for k in wa)
