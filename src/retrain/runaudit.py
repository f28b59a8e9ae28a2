"""The audit of one training run: label issues, duplicates and leakage, the learning curve.

:func:`audit_run` takes a :class:`RunData` (arrays and paths, no training objects), writes
``label_issues.csv``, ``duplicates.csv``, ``learning_curve.csv`` and ``audit.npz`` into the
run folder, and returns the summary that goes into ``metrics.json``. ``audit.npz`` holds
everything ``retrain report RUN_DIR`` needs to rebuild the page without retraining.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain import audit
from retrain.cache import atomic_write_bytes
from retrain.data import TESTING, printable
from retrain.errors import RetrainError

log = logging.getLogger("retrain")

AUDIT_FILE = "audit.npz"
AUDIT_VERSION = 1
# A suspect worth a look: the held-out layers give the given label less than a third.
SUSPECT_SCORE = 2 / 3


@dataclass
class RunData:
    """One row per usable image of every split, in the same order in every array.

    ``proba`` (N, C) are class probabilities from a layer that never saw the row: out-of-fold
    for training and validation rows (``fold`` >= 0), the final layer for test rows (``fold`` -1).
    """

    image_dir: str
    labels: list[str]
    paths: list[str]
    split: list[str]
    y: np.ndarray
    keys: list[bytes]
    X: np.ndarray
    proba: np.ndarray
    fold: np.ndarray
    head_params: dict
    seed: int = 0
    solved_c: float | None = None  # the final layer is the L-BFGS one at this C: the curve's layers are too
    train_count: int = 0  # images the final layer was fitted on (where the learning curve is read)
    skipped: dict[str, str] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)  # step, train_accuracy, ... (training curves)


def audit_run(data: RunData, run_dir: Path, *, learning_curve: bool = True) -> dict:
    """Compute the audit, write its files into ``run_dir`` and return the summary for metrics.json."""
    t0 = time.perf_counter()
    # One pass over the feature similarities gives both each image's neighbours and the near copies.
    nearest = audit.nearest_neighbours(
        data.X,
        max(audit.LABEL_NEIGHBOURS, audit.NEAR_DUPLICATE_REFERENCE),
        groups=data.keys,
        threshold=audit.NEAR_DUPLICATE_FLOOR,
    )
    t_pass = time.perf_counter()
    if not nearest.exact:
        log.info(
            "Audit: %d images, more than %d, so the similarity pass compared each image with the images of "
            "nearby cells only, not with all of them (a neighbour can be missed; docs/report.md measures it)",
            len(data.y),
            audit.EXACT_MAX,
        )
    # Neighbours in feature space raise top-k recall of moved images by ~4 points (docs/report.md).
    issues = audit.rank_label_issues(
        data.proba, np.asarray(data.y), neighbours=audit.LABEL_NEIGHBOURS, nearest=nearest
    )
    t_issues = time.perf_counter()
    pairs = audit.find_duplicates(data.X, data.keys, nearest=nearest)
    t_dups = time.perf_counter()
    curve = _learning_curve(data) if learning_curve else None
    t_curve = time.perf_counter()
    summary = {
        "label_issues": _issue_summary(issues),
        "duplicates": _duplicate_summary(pairs, data),
        "learning_curve": _curve_summary(curve, data) if curve is not None else None,
    }
    _write_label_issues(run_dir / "label_issues.csv", issues, data)
    _write_duplicates(run_dir / "duplicates.csv", pairs, data)
    if curve is not None:
        _write_learning_curve(run_dir / "learning_curve.csv", curve, data.labels)
    save_audit(run_dir / AUDIT_FILE, data, issues, pairs, curve)
    summary["seconds"] = {
        "similarity_pass": round(t_pass - t0, 3),
        "label_issues": round(t_issues - t_pass, 3),
        "duplicates": round(t_dups - t_issues, 3),
        "learning_curve": round(t_curve - t_dups, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    _log_summary(summary)
    return summary


# -- pieces ---------------------------------------------------------------------------------------
def _learning_curve(data: RunData) -> audit.LearningCurve | None:
    labelled = np.flatnonzero(np.asarray(data.fold) >= 0)
    if len(labelled) < 10 or len(np.unique(np.asarray(data.fold)[labelled])) < 2:
        return None
    return audit.learning_curve(
        data.X[labelled],
        np.asarray(data.y)[labelled],
        np.asarray(data.fold)[labelled],
        n_classes=len(data.labels),
        head_params=data.head_params,
        seed=data.seed,
        solved_c=data.solved_c,
    )


def _issue_summary(issues: audit.LabelIssues) -> dict:
    suspects = int((issues.score >= SUSPECT_SCORE).sum())
    return {"rows": len(issues.score), "suspects": suspects, "suspect_score": round(SUSPECT_SCORE, 4)}


def leaked_test_rows(pairs: audit.DuplicatePairs, split: np.ndarray) -> np.ndarray:
    """Test rows that have an exact or near copy outside the test split (a boolean mask (N,))."""
    leaked = np.zeros(len(split), dtype=bool)
    for a, b in zip(pairs.i, pairs.j):
        if split[a] == TESTING and split[b] != TESTING:
            leaked[a] = True
        elif split[b] == TESTING and split[a] != TESTING:
            leaked[b] = True
    return leaked


def _duplicate_summary(pairs: audit.DuplicatePairs, data: RunData) -> dict:
    y, split = np.asarray(data.y), np.asarray(data.split)
    cross = split[pairs.i] != split[pairs.j]
    conflict = y[pairs.i] != y[pairs.j]
    leaked = leaked_test_rows(pairs, split)
    test = split == TESTING
    pred = np.asarray(data.proba).argmax(axis=1)
    clean = test & ~leaked
    return {
        "threshold": audit.NEAR_DUPLICATE_FLOOR,
        "ratio": audit.NEAR_DUPLICATE_RATIO,
        "rule": audit.NEAR_DUPLICATE_RULE,
        "exact_pairs": int((pairs.kind == "exact").sum()),
        "near_pairs": int((pairs.kind == "near").sum()),
        "cross_split_pairs": int(cross.sum()),
        "conflicting_pairs": int(conflict.sum()),
        "leaked_test_images": int(leaked.sum()),
        "test_accuracy_all": float((pred[test] == y[test]).mean()) if test.any() else None,
        "test_count_all": int(test.sum()),
        "test_accuracy_without_leaked": float((pred[clean] == y[clean]).mean()) if clean.any() else None,
        "test_count_without_leaked": int(clean.sum()),
    }


def _curve_summary(curve: audit.LearningCurve, data: RunData) -> dict:
    ok = np.isfinite(curve.accuracy)
    mean = np.where(ok, curve.accuracy, 0).sum(0) / np.maximum(ok.sum(0), 1)
    mean[ok.sum(0) == 0] = np.nan
    fit = audit.fit_saturating(np.tile(curve.sizes, len(curve.accuracy)), curve.accuracy.ravel())
    # The curve's x axis counts the images its fits saw; the final layer saw train_count.
    now = data.train_count or float(curve.sizes[-1])
    out = {
        "fractions": curve.fractions.tolist(),
        "sizes": curve.sizes.round(1).tolist(),
        "accuracy_mean": [None if np.isnan(v) else round(float(v), 4) for v in mean],
        "steps": None
        if data.solved_c is not None
        else min(audit.LEARNING_CURVE_STEPS, int(data.head_params.get("steps", audit.LEARNING_CURVE_STEPS))),
        "C": data.solved_c,
        "seeds": len(curve.accuracy),
        "fit": None,
        "per_class_gain_2x": None,
    }
    if fit is not None:
        out["fit"] = {
            "ceiling": round(fit.ceiling, 4),
            "scale": round(fit.scale, 4),
            "rate": round(fit.rate, 4),
        }
        out["images_now"] = int(now)
        out["predicted_now"] = round(float(fit(now)), 4)
        out["predicted_2x"] = round(float(fit(2 * now)), 4)
        out["gain_2x"] = round(float(fit(2 * now) - fit(now)), 4)
        out["per_class_gain_2x"] = _per_class_gain(curve, data.labels, now)
    return out


def _per_class_gain(curve: audit.LearningCurve, labels: list[str], now: float) -> dict[str, float | None]:
    """Per class: the fitted curve's gain from twice the images (class shares stay as they are)."""
    gains: dict[str, float | None] = {}
    for c, label in enumerate(labels):
        fit = audit.fit_saturating(
            np.tile(curve.sizes, len(curve.accuracy)), curve.per_class[:, :, c].ravel()
        )
        gains[label] = None if fit is None else round(float(fit(2 * now) - fit(now)), 4)
    return gains


# -- files --------------------------------------------------------------------------------------------
def _csv_bytes(header: list[str], rows) -> bytes:
    """UTF-8 CSV; a file name that is not valid UTF-8 keeps its bytes (surrogateescape), so that
    ``retrain relabel`` finds the very file again."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def _write_label_issues(path: Path, issues: audit.LabelIssues, data: RunData) -> None:
    y = np.asarray(data.y)
    rows = []
    for rank, i in enumerate(issues.order, start=1):
        rows.append(
            [
                data.paths[i],
                data.labels[y[i]],
                data.labels[issues.suggested[i]],
                f"{issues.score[i]:.4f}",
                rank,
                data.split[i],
                "",
            ]
        )
    header = ["path", "given_label", "suggested_label", "score", "rank", "split", "action"]
    atomic_write_bytes(path, _csv_bytes(header, rows))


def _write_duplicates(path: Path, pairs: audit.DuplicatePairs, data: RunData) -> None:
    y = np.asarray(data.y)
    rows = [
        [
            data.paths[a],
            data.paths[b],
            kind,
            f"{sim:.4f}",
            data.labels[y[a]],
            data.labels[y[b]],
            data.split[a],
            data.split[b],
        ]
        for a, b, kind, sim in zip(pairs.i, pairs.j, pairs.kind, pairs.similarity)
    ]
    header = ["path_a", "path_b", "kind", "similarity", "label_a", "label_b", "split_a", "split_b"]
    atomic_write_bytes(path, _csv_bytes(header, rows))


def _write_learning_curve(path: Path, curve: audit.LearningCurve, labels: list[str]) -> None:
    rows = []
    for s in range(len(curve.accuracy)):
        for f, frac in enumerate(curve.fractions):
            per = ["" if np.isnan(v) else f"{v:.4f}" for v in curve.per_class[s, f]]
            rows.append([f"{frac:g}", f"{curve.sizes[f]:.1f}", s, f"{curve.accuracy[s, f]:.4f}", *per])
    header = ["fraction", "train_images", "seed", "accuracy", *[f"recall:{label}" for label in labels]]
    atomic_write_bytes(path, _csv_bytes(header, rows))


def _fs(names) -> np.ndarray:
    """File names as bytes: exact even when they are not valid UTF-8."""
    return np.array([os.fsencode(p) for p in names], dtype=bytes) if len(names) else np.zeros(0, dtype="S1")


def save_audit(
    path: Path,
    data: RunData,
    issues: audit.LabelIssues,
    pairs: audit.DuplicatePairs,
    curve: audit.LearningCurve | None,
) -> None:
    arrays = {
        "version": np.array(AUDIT_VERSION),
        "image_dir": np.array(os.fsencode(data.image_dir)),
        "labels": np.array([label.encode("utf-8", "surrogateescape") for label in data.labels], dtype=bytes),
        "paths": _fs(data.paths),
        "split": np.array(data.split, dtype="U10"),
        "y": np.asarray(data.y, dtype=np.int64),
        "keys": np.array([k.hex() for k in data.keys], dtype=str),  # hex: a bytes array drops trailing zeros
        "proba": np.asarray(data.proba, dtype=np.float32),
        "fold": np.asarray(data.fold, dtype=np.int64),
        "issue_score": issues.score.astype(np.float32),
        "issue_suggested": issues.suggested.astype(np.int64),
        "issue_order": issues.order.astype(np.int64),
        "dup_i": pairs.i,
        "dup_j": pairs.j,
        "dup_kind": pairs.kind.astype("U5"),
        "dup_similarity": pairs.similarity.astype(np.float32),
        "skipped_paths": _fs(list(data.skipped)),
        "skipped_reasons": np.array([r.encode() for r in data.skipped.values()], dtype=bytes)
        if data.skipped
        else np.zeros(0, "S1"),
    }
    for name, values in data.history.items():
        arrays[f"history_{name}"] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if curve is not None:
        arrays |= {
            "lc_fractions": curve.fractions,
            "lc_sizes": curve.sizes,
            "lc_accuracy": curve.accuracy,
            "lc_per_class": curve.per_class,
        }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_audit(path: Path) -> dict:
    """``audit.npz`` as a dict of arrays, file names back as str; a clear error if absent or damaged."""
    if not path.exists():
        raise RetrainError(
            f"{printable(str(path))} does not exist: this run was made with --no_report or by an older "
            "retrain. Train again without --no_report (cached features make it quick)."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - np.load raises many types for a damaged file
        raise RetrainError(
            f"{printable(str(path))} is damaged ({type(exc).__name__}); train again."
        ) from None
    if int(out.get("version", -1)) != AUDIT_VERSION:
        raise RetrainError(f"{printable(str(path))} was written by another version of retrain; train again.")
    out["image_dir"] = os.fsdecode(bytes(out["image_dir"]))
    out["labels"] = [b.decode("utf-8", "surrogateescape") for b in out["labels"]]
    for name in ("paths", "skipped_paths"):
        out[name] = [os.fsdecode(b) for b in out[name]]
    out["skipped_reasons"] = [b.decode() for b in out["skipped_reasons"]]
    out["keys"] = [bytes.fromhex(k) for k in out["keys"]]
    return out


# -- log ------------------------------------------------------------------------------------------------
def _log_summary(summary: dict) -> None:
    dup, issues, curve = summary["duplicates"], summary["label_issues"], summary["learning_curve"]
    log.info(
        "Audit: %d suspected label error(s) of %d images (label_issues.csv); %d exact and %d near duplicate "
        "pair(s) (duplicates.csv); %.1f s",
        issues["suspects"],
        issues["rows"],
        dup["exact_pairs"],
        dup["near_pairs"],
        summary["seconds"]["total"],
    )
    if dup["conflicting_pairs"]:
        log.warning(
            "%d duplicate pair(s) carry different labels (see duplicates.csv and report.html)",
            dup["conflicting_pairs"],
        )
    if dup["leaked_test_images"]:
        acc = dup["test_accuracy_without_leaked"]
        shown = (
            f"{100 * acc:.1f}% (N={dup['test_count_without_leaked']})"
            if acc is not None
            else "not measurable"
        )
        log.warning(
            "%d test image(s) have a copy in training or validation (leakage); test accuracy without them: "
            "%s",
            dup["leaked_test_images"],
            shown,
        )
    if curve and curve.get("gain_2x") is not None:
        log.info(
            "Learning curve: %.1f%% with %d images; twice as many would give about %+.1f points",
            100 * curve["predicted_now"],
            curve["images_now"],
            100 * curve["gain_2x"],
        )
