"""A run's audit files and report.html: written every run, escaped, rebuilt by `retrain report`, fast at 10,000 images."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain
from conftest import make_image_folder
from retrain.cli import retrain_main
from retrain.report import REPORT_FILE, write_report
from retrain.runaudit import RunData, audit_run, load_audit

EVIL = "<img src=x onerror=alert(1)>"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def audited_run(tmp_path: Path, fast_config: dict, caplog):
    """A run on colour folders with one red photo filed under green, an exact copy across classes,
    and an HTML-looking, unicode file name."""
    caplog.set_level(logging.INFO, logger="retrain")
    root = make_image_folder(tmp_path / "images", per_class=14)
    shutil.move(root / "red" / "img_003.jpg", root / "green" / "moved_red.jpg")
    shutil.copy(root / "blue" / "img_001.jpg", root / "red" / "copy_of_blue.jpg")
    shutil.move(root / "blue" / "img_002.jpg", root / "blue" / f"{EVIL} café ☕.jpg")
    result = retrain.train(root, **fast_config)
    return root, result


def test_a_run_writes_metrics_issues_duplicates_curve_and_report(audited_run, caplog):
    root, result = audited_run
    run = result.run_dir
    for name in ("label_issues.csv", "duplicates.csv", "learning_curve.csv", "audit.npz", REPORT_FILE):
        assert (run / name).exists(), name
    messages = [r.getMessage() for r in caplog.get_records("setup")]
    line = next(m for m in messages if m.startswith("Final test accuracy"))
    assert re.fullmatch(r"Final test accuracy = [\d.]+% \(N=\d+, 95% CI [\d.]+-[\d.]+%\)", line), line

    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["count"] == result.test_count and len(test["per_class"]) == 3
    assert sum(map(sum, test["confusion"])) == test["count"]
    assert test["accuracy_ci"][0] <= test["accuracy"] <= test["accuracy_ci"][1]

    issues = _rows(run / "label_issues.csv")
    n_images = sum(1 for _ in root.rglob("*.jpg"))
    assert len(issues) == n_images  # every image of every split
    assert list(issues[0]) == ["path", "given_label", "suggested_label", "score", "rank", "split", "action"]
    top = {r["path"]: r for r in issues[:3]}
    moved = str((root / "green" / "moved_red.jpg").resolve())
    assert moved in top and top[moved]["suggested_label"] == "red"
    assert {r["split"] for r in issues} == {"training", "validation", "testing"}

    dups = _rows(run / "duplicates.csv")
    exact = [d for d in dups if d["kind"] == "exact"]
    assert len(exact) == 1 and {exact[0]["label_a"], exact[0]["label_b"]} == {"red", "blue"}
    assert metrics["audit"]["duplicates"]["conflicting_pairs"] >= 1
    curve = _rows(run / "learning_curve.csv")
    assert {r["fraction"] for r in curve} >= {"0.1", "1"} and "recall:red" in curve[0]


def test_the_report_escapes_names_and_embeds_everything(audited_run):
    _, result = audited_run
    page = (result.run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert EVIL not in page and "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "café ☕" in page
    assert "default-src 'none'" in page  # the page may load nothing, from anywhere
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    for section in (
        "What to do next",
        "Data",
        "Training",
        "Test results",
        "Suspected label errors",
        "Duplicates and leakage",
        "How many more photos?",
    ):
        assert f">{section}</h2>" in page
    assert "data:image/jpeg;base64," in page
    # the default (solved) layer: its path over C is the training chart, and the test figure says it came first
    assert 'aria-label="out-of-fold accuracy by regularisation C"' in page and ">0.001</text>" in page
    # ... next to its criterion, the cross entropy, both marked at the chosen C
    assert 'aria-label="out-of-fold cross entropy by C (C&#x27;s criterion)"' in page
    chosen = f"chosen C = {result.metrics['crossfit']['C']:.3g}</text>"
    assert page.count('class="marker"') == 2 and page.count(chosen) == 2
    assert "Measured by the layer before the test images were folded in" in page


def test_retrain_report_rebuilds_the_page_without_training(audited_run, capsys):
    _, result = audited_run
    page = result.run_dir / REPORT_FILE
    before = page.read_text(encoding="utf-8")
    page.unlink()
    assert retrain_main(["report", str(result.run_dir)]) == 0
    assert page.read_text(encoding="utf-8") == before
    assert "Wrote" in capsys.readouterr().out


def test_retrain_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert retrain_main(["report", str(tmp_path)]) == 2
    assert "metrics.json" in capsys.readouterr().err


def test_no_report_skips_the_audit(colour_dir, fast_config):
    result = retrain.train(colour_dir, no_report=True, **fast_config)
    assert not (result.run_dir / REPORT_FILE).exists() and not (result.run_dir / "audit.npz").exists()
    assert "test" in result.metrics and "audit" not in result.metrics


def test_a_run_with_skipped_files_and_a_one_image_class(tmp_path, fast_config):
    root = make_image_folder(tmp_path / "images", per_class=10)
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "lonely").mkdir()
    shutil.copy(root / "green" / "img_000.jpg", root / "lonely" / "only.jpg")
    result = retrain.train(root, **fast_config)
    page = (result.run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert "Skipped files (1)" in page and "broken.jpg" in page
    assert ">lonely</td>" in page


def _synthetic_run(tmp_path: Path, n: int = 10_000, n_classes: int = 10, d: int = 64) -> Path:
    """A run folder with audit.npz and metrics.json for ``n`` images (300 distinct small JPEGs on disk)."""
    rng = np.random.default_rng(0)
    files = []
    for k in range(300):
        path = tmp_path / "img" / f"c{k % n_classes}" / f"{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path, quality=80)
        files.append(str(path))
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, d))
    X = (centres[y] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)
    logits = 3 * X @ centres.T / d
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    draw = rng.random(n)  # ~10% test and ~10% validation images in every class
    split = np.where(draw < 0.1, "testing", np.where(draw < 0.2, "validation", "training"))
    data = RunData(
        image_dir=str(tmp_path / "img"),
        labels=[f"class {c}" for c in range(n_classes)],
        paths=[files[i % len(files)] for i in range(n)],
        split=list(split),
        y=y,
        keys=[i.to_bytes(20, "big") for i in range(n)],
        X=X,
        proba=proba,
        fold=np.where(split == "testing", -1, np.arange(n) % 5),
        head_params={"steps": 100},
        train_count=8000,
        history={
            "step": list(range(10, 4001, 10)),
            "train_accuracy": [0.9] * 400,
            "cross_entropy": [0.3] * 400,
            "validation_accuracy": [0.8] * 400,
            "validation_cross_entropy": [0.5] * 400,
        },
    )
    run = tmp_path / "run"
    run.mkdir()
    summary = audit_run(data, run)
    test = split == "testing"
    from retrain.audit import classification_metrics

    metrics = {"test": classification_metrics(y[test], proba[test].argmax(1), data.labels), "audit": summary}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_report_of_a_10000_image_run_takes_under_5_seconds(tmp_path):
    run = _synthetic_run(tmp_path)
    t0 = time.perf_counter()
    write_report(run)
    seconds = time.perf_counter() - t0
    assert seconds < 5, seconds
    page = (run / REPORT_FILE).read_text(encoding="utf-8")
    assert page.count('<button class="cell') == 100
    saved = load_audit(run / "audit.npz")
    assert len(saved["paths"]) == 10_000
    assert saved["keys"][:300] == [i.to_bytes(20, "big") for i in range(300)]  # keys ending in zero bytes too


def test_a_large_run_says_its_similarity_pass_searched_cells(tmp_path, monkeypatch, caplog):
    import retrain.audit

    monkeypatch.setattr(retrain.audit, "EXACT_MAX", 1000)
    with caplog.at_level(logging.INFO, logger="retrain"):
        run = _synthetic_run(tmp_path, n=3000)
    assert "3000 images, more than 1000, so the similarity pass compared each image" in caplog.text
    saved = load_audit(run / "audit.npz")
    assert len(saved["paths"]) == 3000


def test_calibration_figures_in_metrics_get_a_reliability_diagram(audited_run):
    _, result = audited_run
    path = result.run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    bins = {
        "ece": 0.05,
        "bins": 3,
        "count": [0, 4, 10],
        "confidence": [None, 0.6, 0.95],
        "accuracy": [None, 0.5, 1.0],
    }
    metrics["calibration"] = {
        "method": "temperature",
        "temperature": 1.7,
        "fitted_on": "out-of-fold",
        "ece_before": {"test": 0.08},
        "ece_after": {"test": 0.03},
        "reliability": {"test": {"before": bins, "after": bins}},
    }
    path.write_text(json.dumps(metrics))
    page = write_report(result.run_dir).read_text(encoding="utf-8")
    assert "ECE on test" in page and "reliability on test" in page and page.count("<circle") >= 4
