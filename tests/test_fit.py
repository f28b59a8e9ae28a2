"""The final layer learns from training + validation, chosen by one cross-fit; the test split stays untouched."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import retrain
from retrain.crossfit import CrossFit
from retrain.data import TESTING, assign_splits, discover
from retrain.fit import labelled_groups


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {
        t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("final_")
    }


def test_groups_join_identical_content_and_nohash_names_transitively():
    keys = [b"a", b"b", b"a", b"c", b"d", b"e"]
    paths = ["x/1.jpg", "x/leaf_nohash_1.jpg", "x/3.jpg", "x/leaf_nohash_2.jpg", "x/5.jpg", "x/6_nohash_.jpg"]
    g = labelled_groups(keys, paths)
    assert g[0] == g[2]  # same content
    assert g[1] == g[3]  # same _nohash_ name
    assert len({g[0], g[1], g[4], g[5]}) == 4
    # content b"c" also appears under another name: that name joins the leaf group
    g = labelled_groups(keys + [b"c"], paths + ["y/7.jpg"])
    assert g[6] == g[1] == g[3]


def test_default_run_fits_training_plus_validation_and_says_so(colour_dir, fast_config, caplog):
    caplog.set_level(logging.INFO, logger="retrain")
    result = retrain.train(colour_dir, **fast_config)
    m = json.loads((Path(fast_config["output_dir"]) / "metrics.json").read_text())
    labelled = 36 - m["test_count"]
    assert m["final_fit"] == "all" and m["final_fit_count"] == 36 > labelled > m["train_count"]
    assert m["validation_kind"] == "out-of-fold" and m["crossfit"]["count"] == labelled
    assert isinstance(result.cross_fit, CrossFit) and result.cross_fit.logits.shape == (labelled, 3)
    assert result.validation_accuracy == result.cross_fit.accuracy
    assert m["head_solver"] == "lbfgs" and m["best_step"] is None
    assert m["crossfit"]["C"] == result.cross_fit.c and m["crossfit"]["curve_C"][0] == 1e-3
    assert f"Cross-fitting 5 folds on {labelled} training+validation images: best at C = " in caplog.text
    assert f"final layer solved (L-BFGS) on all {labelled}" in caplog.text
    assert (
        "Out-of-fold accuracy / cross entropy by regularisation C" in caplog.text
        and "L-BFGS iterations" in caplog.text
    )
    assert (
        "Every labelled photo counts (--final_fit all)" in caplog.text
        and "7 test images included" in caplog.text
    )
    # step flags are not silently ignored by the solved layer
    assert (
        "--how_many_training_steps 200, --eval_step_interval 50: for a layer trained by steps" in caplog.text
    )


def test_head_solver_steps_chooses_the_number_of_steps(colour_dir, fast_config, caplog):
    caplog.set_level(logging.INFO, logger="retrain")
    result = retrain.train(colour_dir, **fast_config, head_solver="steps")
    m = result.metrics
    labelled = 36 - m["test_count"]
    assert m["head_solver"] == "steps" and m["final_fit_count"] == 36
    assert m["best_step"] == result.cross_fit.best_steps <= fast_config["how_many_training_steps"]
    assert f"final layer fitted on all {labelled}" in caplog.text and ": Train accuracy = " in caplog.text


def test_final_fit_train_is_retrain_py_semantics(colour_dir, fast_config, caplog):
    caplog.set_level(logging.INFO, logger="retrain")
    result = retrain.train(colour_dir, **fast_config, final_fit="train")
    m = result.metrics
    assert m["final_fit"] == "train" and m["final_fit_count"] == m["train_count"]
    assert m["validation_kind"] == "held-out" and result.cross_fit is not None  # computed once all the same
    assert "Validation accuracy = " in caplog.text and "Kept the weights of step" in caplog.text


def _replace_test_images(folder: Path, seed: int) -> list[Path]:
    tests = [Path(r.path) for r in assign_splits(discover(folder)).records if r.split == TESTING]
    rng = np.random.default_rng(seed)
    for p in tests:
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(p, quality=90)
    return tests


def test_test_images_never_reach_the_default_layer_but_do_with_final_fit_all(
    colour_dir, fast_config, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="retrain")
    runs = {}
    for seed in (1, 2):
        assert _replace_test_images(colour_dir, seed)
        for mode in ("train+val", "all"):
            out = tmp_path / f"{mode}-{seed}"
            runs[mode, seed] = retrain.train(
                colour_dir, **{**fast_config, "output_dir": str(out)}, final_fit=mode
            )
    a, b = _weights(runs["train+val", 1].output_graph), _weights(runs["train+val", 2].output_graph)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # other test pixels: the very same exported layer
    a, b = _weights(runs["all", 1].output_graph), _weights(runs["all", 2].output_graph)
    assert not all(np.array_equal(a[k], b[k]) for k in a)
    m = runs["all", 1].metrics
    assert m["final_fit_count"] == 36 and m["test_accuracy"] == runs["train+val", 1].test_accuracy
    assert "7 test images included" in caplog.text and "was measured before" in caplog.text
    # The test figures of the open-world stage are those of the layer that never saw the test images.
    before = runs["train+val", 1].metrics
    assert m["calibration"]["ece_after"]["test"] == before["calibration"]["ece_after"]["test"]
    assert m["unknown"]["test_called_unknown"] == before["unknown"]["test_called_unknown"]


def test_the_step_solver_uses_no_weight_decay_unless_the_flag_gives_one(colour_dir, fast_config, caplog):
    # The decay grid cost 3.2x the cross-fit and gained nothing measurable (docs/benchmarks.md): the step
    # solver tries one value, 0, and the log says no choice was made.
    from retrain.fit import WEIGHT_DECAYS

    assert WEIGHT_DECAYS == (0.0,)
    caplog.set_level(logging.INFO, logger="retrain")
    steps = {**fast_config, "head_solver": "steps"}
    chosen = retrain.train(colour_dir, **steps).metrics
    assert chosen["weight_decay"] == chosen["crossfit"]["weight_decay"] == 0.0
    assert list(chosen["crossfit"]["weight_decay_accuracy"]) == ["0"]
    assert "weight decay 0 (" in caplog.text and "chosen by the cross-fit" not in caplog.text
    config = json.loads((Path(fast_config["output_dir"]) / "config.json").read_text())
    assert config["weight_decay"] == chosen["weight_decay"]  # the run's config says what it used
    caplog.clear()
    out = str(Path(fast_config["output_dir"]).with_name("explicit"))
    given = retrain.train(colour_dir, **{**steps, "output_dir": out}, weight_decay=0.02).metrics
    assert given["weight_decay"] == given["crossfit"]["weight_decay"] == 0.02
    assert list(given["crossfit"]["weight_decay_accuracy"]) == ["0.02"]
    assert "weight decay 0.02 (" in caplog.text and "chosen by the cross-fit" not in caplog.text


def test_the_lbfgs_layer_strength_is_chosen_unless_the_flag_gives_one(colour_dir, fast_config):
    chosen = retrain.train(colour_dir, **fast_config).metrics
    n = chosen["crossfit"]["count"]  # the strength of the layer the test accuracy describes
    assert chosen["weight_decay"] == pytest.approx(1 / (chosen["crossfit"]["C"] * n))
    assert len(chosen["crossfit"]["curve_C"]) > 1
    config = json.loads((Path(fast_config["output_dir"]) / "config.json").read_text())
    assert config["weight_decay"] == chosen["weight_decay"]
    out = str(Path(fast_config["output_dir"]).with_name("explicit"))
    given = retrain.train(colour_dir, **{**fast_config, "output_dir": out}, weight_decay=0.02).metrics
    assert given["weight_decay"] == 0.02  # the flag's value, exactly; the one C it means is the whole path
    assert given["crossfit"]["curve_C"] == [pytest.approx(1 / (0.02 * n))]
    out = str(Path(fast_config["output_dir"]).with_name("train"))
    plain = retrain.train(colour_dir, **{**fast_config, "output_dir": out}, final_fit="train").metrics
    assert plain["weight_decay"] == 0.0  # retrain.py's way: no decay unless asked for
