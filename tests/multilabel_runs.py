"""A multi-label run folder built by hand (metrics.json, multilabel.npz, config.json and small photos),
as ``retrain --multi_label`` leaves it, for the report's tests without training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from retrain.mlhead import multilabel_metrics

EVIL = "<img src=x onerror=alert(1)>"
LABELS = ["beach", "dog", EVIL, "sky"]
COLOURS = {"beach": (230, 200, 120), "dog": (120, 70, 30), EVIL: (200, 40, 160), "sky": (90, 150, 240)}
THRESHOLDS = [0.5, 0.4, 0.6, 0.3]


def make_multilabel_run(base: Path, n: int = 40, seed: int = 0) -> Path:
    """``base/images`` (stripes of each label's colour) and the run folder ``base/run``; returns the run folder."""
    rng = np.random.default_rng(seed)
    images, run = base / "images", base / "run"
    images.mkdir(parents=True)
    run.mkdir()
    truth = rng.random((n, len(LABELS))) < 0.4
    truth[truth.sum(axis=1) == 0, 0] = True  # every photo has a label ...
    truth[1] = True  # ... one has all of them
    split = np.array(
        ["training"] * (n // 2) + ["validation"] * (n // 4) + ["testing"] * (n - n // 2 - n // 4)
    )
    paths = []
    for i in range(n):
        name = f"{EVIL} photo {i:02d}.jpg" if i == n - 1 else f"photo_{i:02d}.jpg"
        px = np.zeros((48, 48, 3), np.uint8)
        on = [LABELS[j] for j in np.flatnonzero(truth[i])]
        for k, label in enumerate(on):
            px[:, k * 48 // len(on) : (k + 1) * 48 // len(on)] = COLOURS[label]
        Image.fromarray(px).save(images / name, quality=90)
        paths.append(str(images / name))
    # Probabilities that mostly agree with the truth, with a few confident mistakes of both kinds.
    probs = np.clip(np.where(truth, 0.75, 0.15) + rng.normal(0, 0.2, truth.shape), 0.01, 0.99).astype(
        np.float32
    )
    te = np.flatnonzero(split == "testing")
    probs[te[0], np.flatnonzero(truth[te[0]])[0]] = 0.03  # a missed label, almost sure it is absent
    probs[te[1], np.flatnonzero(~truth[te[1]])[0]] = 0.97  # a spurious label, almost sure it is present
    probs[-1, :] = np.where(truth[-1], 0.02, 0.98)  # the HTML-named photo: every label wrong
    thresholds = np.array(THRESHOLDS, np.float32)
    held = np.flatnonzero(split != "testing")
    metrics = {
        "kind": "multi_label",
        "labels": LABELS,
        "thresholds": THRESHOLDS,
        "threshold_source": {label: "shared" if label == "sky" else "tuned" for label in LABELS},
        "multi_label": {
            "validation": multilabel_metrics(probs[held], truth[held], thresholds, LABELS),
            "test": multilabel_metrics(probs[te], truth[te], thresholds, LABELS),
        },
        "validation_kind": "out-of-fold",
        "test_count": int(len(te)),
        "best_step": 200,
        "train_count": int((split == "training").sum()),
        "image_count": n,
        "copies_merged": 7,
        "final_fit": "train+val",
        "final_fit_count": int(len(held)),
        "skipped_files": 0,
        "seed": 0,
        "crossfit": {
            "mAP": 0.91,
            "best_steps": 200,
            "folds": 5,
            "count": int(len(held)),
            "seconds": 0.5,
            "curve_steps": [50, 100, 150, 200, 250],
            "curve_map": [0.6, 0.8, 0.88, 0.91, 0.9],
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run / "config.json").write_text(json.dumps({"image_dir": str(images)}))
    np.savez(
        run / "multilabel.npz",
        paths=np.array(paths, dtype=str),
        truth=truth,
        probs=probs,
        labels=np.array(LABELS, dtype=str),
        thresholds=thresholds,
        split=split.astype(str),
    )
    return run


_MODELS: dict[float | None, object] = {}


def multilabel_model(tmp_path_factory, threshold: float | None = None):
    """A real ``retrain --multi_label`` run on the tiny backbone (colour photos, labels from copies across
    folders), trained once per session and threshold; its retrain.TrainResult. ``threshold``:
    ``--multi_label_threshold`` (e.g. 0.999: no photo gets a label)."""
    if threshold not in _MODELS:
        import retrain
        from conftest import TINY
        from test_multilabel import make_folder_set

        base = Path(tmp_path_factory.getbasetemp()) / "multilabel-model"
        if not (base / "images").exists():
            make_folder_set(base / "images", n=36)
        _MODELS[threshold] = retrain.train(
            base / "images",
            multi_label=True,
            multi_label_threshold=threshold,
            architecture=TINY,
            bottleneck_dir=str(base / "bottlenecks"),
            model_dir=str(base / "models"),
            output_dir=str(tmp_path_factory.mktemp("multilabel-run")),
            how_many_training_steps=300,
            eval_step_interval=100,
            seed=1,
            quiet=True,
        )
    return _MODELS[threshold]
