"""End to end with the real packaged EfficientNet-Lite0 weights and the bundled sample photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrain
from conftest import SAMPLE_PHOTOS


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from retrain.cli import " + args[0] + "; sys.exit(" + args[0] + "())",
            *args[1:],
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_train_export_reload_classify(tmp_path: Path):
    photos = shutil.copytree(SAMPLE_PHOTOS, tmp_path / "photos")
    run = _cli(
        "retrain_main",
        "--image_dir",
        str(photos),
        "--how_many_training_steps",
        "500",
        "--bottleneck_dir",
        str(tmp_path / "bn"),
        "--seed",
        "0",
        "--quiet",
        "--output_graph",
        str(tmp_path / "model.onnx"),
        "--output_labels",
        str(tmp_path / "labels.txt"),
        "--saved_model_dir",
        str(tmp_path / "serving"),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    final = [line for line in run.stdout.splitlines() if line.startswith("Final test accuracy = ")]
    assert final, run.stdout
    assert float(final[0].split("=")[1].split("%")[0]) >= 85.0
    labels = (tmp_path / "labels.txt").read_text().splitlines()
    assert labels == sorted(p.name for p in SAMPLE_PHOTOS.iterdir() if p.is_dir())
    # Classify every sample photo through label_image --json, reading the model back from disk.
    out = _cli(
        "label_image_main",
        "--graph",
        str(tmp_path / "model.onnx"),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--json",
        "--image",
        str(photos),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == sum(1 for _ in photos.rglob("*.jpg"))
    right = sum(Path(r["image"]).parent.name == r["predictions"][0]["label"] for r in rows)
    assert right / len(rows) >= 0.9
    # The Python API and the serving folder give the same answers as the file.
    clf = retrain.load(tmp_path / "serving")
    assert clf.labels == labels
    first = rows[0]
    pred = clf.classify(first["image"])[0][0]
    assert pred.label == first["predictions"][0]["label"]
    assert abs(pred.score - first["predictions"][0]["score"]) < 1e-4
    manifest = json.loads((tmp_path / "serving" / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "efficientnet_lite0"
    assert manifest["preprocessing"]["input_size"] == 224


@pytest.mark.slow
def test_shuffled_labels_stay_near_chance(tmp_path: Path):
    """Must fail if anything leaks between training and test: random labels cannot be learned."""
    photos = tmp_path / "shuffled"
    files = sorted(SAMPLE_PHOTOS.rglob("*.jpg"))
    classes = sorted(p.name for p in SAMPLE_PHOTOS.iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    for i, f in enumerate(files):
        dest = photos / classes[rng.integers(len(classes))]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f"{i}_{f.name}")
    result = retrain.train(
        photos,
        how_many_training_steps=500,
        seed=0,
        quiet=True,
        bottleneck_dir=str(tmp_path / "bn"),
        output_dir=str(tmp_path / "out"),
        testing_percentage=30,
    )
    assert result.test_count >= 20
    assert result.test_accuracy < 0.55
