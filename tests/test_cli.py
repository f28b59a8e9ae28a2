from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrain.cli import label_image_main, retrain_main, training_parser
from retrain.config import TrainConfig

# Every flag of the last TF Hub retrain.py, plus the codelab's --architecture and --model_dir.
RETRAIN_PY_FLAGS = {
    "image_dir": "x",
    "output_graph": "g.pb",
    "intermediate_output_graphs_dir": "i",
    "intermediate_store_frequency": "5",
    "output_labels": "l.txt",
    "summaries_dir": "s",
    "how_many_training_steps": "7",
    "learning_rate": "0.5",
    "testing_percentage": "11",
    "validation_percentage": "12",
    "eval_step_interval": "3",
    "train_batch_size": "9",
    "test_batch_size": "8",
    "validation_batch_size": "-1",
    "bottleneck_dir": "b",
    "final_tensor_name": "out",
    "random_crop": "5",
    "random_scale": "6",
    "random_brightness": "7",
    "tfhub_module": "efficientnet_lite1",
    "saved_model_dir": "sm",
    "logging_verbosity": "WARN",
    "checkpoint_path": "c.npz",
    "architecture": "efficientnet_lite2",
    "model_dir": "m",
}
SWITCHES = ("print_misclassified_test_images", "flip_left_right")


def test_every_retrain_py_flag_is_accepted_with_its_meaning():
    argv = [f"--{k}={v}" for k, v in RETRAIN_PY_FLAGS.items()] + [f"--{s}" for s in SWITCHES]
    ns = training_parser().parse_args(argv)
    for key, value in RETRAIN_PY_FLAGS.items():
        assert str(getattr(ns, key)) in (
            value,
            str(float(value)) if value.lstrip("-").replace(".", "").isdigit() else value,
        )
    assert ns.print_misclassified_test_images and ns.flip_left_right
    assert set(vars(ns)) <= set(TrainConfig.field_names())


def test_dashed_spelling_works_too():
    ns = training_parser().parse_args(["--image-dir", "photos", "--how-many-training-steps", "5"])
    assert ns.image_dir == "photos" and ns.how_many_training_steps == 5


def test_unknown_flag_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit) as exc:
        retrain_main(["--image_dir", "x", "--how_many_trainig_steps", "5"])
    assert exc.value.code == 2
    assert "did you mean --how_many_training_steps" in capsys.readouterr().err


def test_no_prefix_guessing(capsys):
    with pytest.raises(SystemExit):
        training_parser().parse_args(["--how_many", "5"])


def test_legacy_architecture_gets_a_clear_message(tmp_path: Path, colour_dir, capsys):
    code = retrain_main(
        [
            "--image_dir",
            str(colour_dir),
            "--architecture",
            "mobilenet_0.50_224",
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "efficientnet_lite0" in err and "Traceback" not in err


def test_train_then_label_image_json(tmp_path: Path, colour_dir, fast_config, capsys):
    args = [f"--{k}={v}" for k, v in fast_config.items() if not isinstance(v, bool)] + ["--quiet"]
    assert retrain_main(["--image_dir", str(colour_dir), "--print_misclassified_test_images", *args]) == 0
    out = capsys.readouterr().out
    assert "Cross-fitting 5 folds on 29 training+validation images: best at C = " in out
    assert "out-of-fold accuracy" in out and "L-BFGS iterations" in out
    assert "Final test accuracy = " in out and "=== MISCLASSIFIED TEST IMAGES ===" in out
    graph = Path(fast_config["output_dir"]) / "output_graph.onnx"
    labels = Path(fast_config["output_dir"]) / "output_labels.txt"
    assert labels.read_text().split("\n")[:3] == ["blue", "green", "red"]
    code = label_image_main(
        ["--graph", str(graph), "--labels", str(labels), "--json", "--image", str(colour_dir)]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 36
    right = sum(Path(x["image"]).parent.name == x["predictions"][0]["label"] for x in lines)
    assert right >= 33
    assert all(len(x["predictions"]) == 3 for x in lines)


def test_label_image_reports_contradicting_flags(tmp_path: Path, colour_dir, fast_config, capsys):
    import retrain

    result = retrain.train(colour_dir, **fast_config)
    capsys.readouterr()
    image = str(next((colour_dir / "red").iterdir()))
    code = label_image_main(
        [
            "--graph",
            str(result.output_graph),
            "--image",
            image,
            "--input_layer=Placeholder",
            "--output_layer=final_result",
            "--input_mean=128",
            "--input_std=128",
            "--input_height=299",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "--input_height 299 ignored" in captured.err and "--input_mean/--input_std ignored" in captured.err
    assert "Placeholder" not in captured.err
    assert captured.out.splitlines()[0].startswith("red ")
