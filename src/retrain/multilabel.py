"""``retrain --multi_label``: several labels per photo (issue 14; the user's page is docs/multilabel.md).

The labels come from the folders (the same photo copied or linked into several class folders carries
all of those labels: the content-keyed cache makes the copies one feature vector, so they are one row,
never counted twice, and always in one split) or from ``--labels_file`` (:mod:`retrain.labels_file`).

The stages mirror the single-label run (retrain.train) on the same cached features:

1. rows: one per distinct image, a (N, L) truth matrix, the split of retrain.py's hash (copies and
   ``_nohash_`` near-duplicates share one);
2. a cross-fit over training + validation (5 folds, groups kept whole) chooses the number of steps
   by out-of-fold mAP and gives every one of those images probabilities from a layer that never saw it;
3. the final sigmoid layer (:class:`retrain.mlhead.SigmoidHead`) on training + validation for that
   many steps (``--final_fit train``: on training alone, best step by validation mAP);
4. per-label thresholds maximising example-based F1 on the held-out probabilities, each pulled toward one
   shared threshold (:func:`retrain.mlhead.tune_thresholds`; ``--multi_label_threshold``: one for all);
5. metrics on the test split, ``multilabel.npz``, the model (sigmoid output, manifest with the
   thresholds), ``metrics.json`` and the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.backbones import BackboneSpec
from retrain.cache import atomic_write_bytes
from retrain.config import TrainConfig
from retrain.crossfit import DEFAULT_FOLDS, PATIENCE, checkpoint_steps, group_ids
from retrain.data import (
    TESTING,
    TRAINING,
    VALIDATION,
    Dataset,
    ImageRecord,
    hash_percentage,
    printable,
    same_image_groups,
    which_split,
)
from retrain.errors import ConfigError, DatasetError, RetrainError
from retrain.mlhead import (
    MLStep,
    SigmoidHead,
    bce,
    fit_sigmoid_layers,
    mean_average_precision,
    multilabel_metrics,
    sigmoid,
    tune_thresholds,
)
from retrain.summaries import head_histograms, histogram_interval

log = logging.getLogger("retrain")

NPZ_FILE = "multilabel.npz"
# Out-of-fold mAP differences up to this fraction of the best's shortfall from 1 are noise to the cross-fit: it
# keeps the fewest steps within it of the best and stops once it has not been beaten by more for PATIENCE
# checkpoints (docs/multilabel.md, Speed).
MAP_TOLERANCE = 0.005
# Single-label settings a multi-label run does not use (it says so when one is set).
_NOT_FOR_MULTI_LABEL = (
    "intermediate_store_frequency",
    "print_misclassified_test_images",
    "test_batch_size",
    "unknown_threshold",
    "calibration",
)


@dataclass
class Rows:
    """One row per distinct image: its features, its labels (N, L) and its split."""

    labels: list[str]
    paths: list[str]  # one file per distinct image (the first name among its copies)
    keys: list[bytes]
    X: np.ndarray  # (N, D) float32
    Y: np.ndarray  # (N, L) bool
    split: np.ndarray  # (N,) str
    group: np.ndarray  # (N,) rows that must share a fold (copies, _nohash_ names)
    copies: int  # files folded into another row as a copy of the same photo

    def where(self, *names: str) -> np.ndarray:
        return np.flatnonzero(np.isin(self.split, names))


@dataclass
class MLCrossFit:
    """Out-of-fold probabilities (N, L) of the training + validation rows and how they were chosen."""

    probs: np.ndarray
    fold: np.ndarray
    curve_steps: list[int]
    curve_map: list[float]
    curve_loss: list[float]
    best_steps: int
    seconds: float

    @property
    def map(self) -> float:
        return self.curve_map[self.curve_steps.index(self.best_steps)]


# -- the run -------------------------------------------------------------------------------------------
def train_multi_label(cfg: TrainConfig, spec: BackboneSpec, seed: int, t_start: float):
    """``train()`` with ``--multi_label`` (or ``--labels_file``): discover -> features -> rows -> cross-fit ->
    sigmoid layer -> thresholds -> test -> export -> metrics. Returns a retrain.train.TrainResult."""
    from retrain.train import TrainResult, _check_writable, _discover, _features, _link_latest, _resolve_paths

    timings: dict[str, float] = {}
    unused = [n for n in _NOT_FOR_MULTI_LABEL if getattr(cfg, n) != getattr(TrainConfig, n)]
    if unused:
        log.warning(
            "--multi_label: %s have no effect on multi-label runs (docs/multilabel.md)",
            ", ".join(f"--{n}" for n in unused),
        )
    if cfg.labels_file:
        dataset, file_labels = dataset_from_labels_file(cfg)
        for notice in dataset.notices:
            log.warning("%s", notice)
    else:
        dataset, file_labels = _discover(cfg), None
    paths = _resolve_paths(cfg, reserve=True)
    _check_writable(paths, cfg)
    table = _features(cfg, spec, dataset)
    timings["features"] = table.seconds
    rows = build_rows(
        dataset,
        table,
        file_labels,
        validation_percentage=cfg.validation_percentage,
        testing_percentage=cfg.testing_percentage,
    )
    _report_rows(rows)
    labels = rows.labels
    tv, tr, te = rows.where(TRAINING, VALIDATION), rows.where(TRAINING), rows.where(TESTING)
    params = head_params(cfg)
    fit = fit_multi_label(cfg, spec, rows, seed, paths=paths, timings=timings)
    head, cross, with_validation, fit_idx = fit.head, fit.cross, fit.with_validation, fit.fit_idx
    held_idx, held_probs, thresholds, sources = fit.held_idx, fit.held_probs, fit.thresholds, fit.sources

    validation = (
        multilabel_metrics(held_probs, rows.Y[held_idx], thresholds, labels) if len(held_idx) else None
    )
    test_probs = head.predict_proba(rows.X[te])
    test = multilabel_metrics(test_probs, rows.Y[te], thresholds, labels) if len(te) else None
    _log_results(validation, test, with_validation)
    write_npz(paths.run_dir / NPZ_FILE, rows, held_idx, held_probs, te, test_probs, thresholds)

    fitted = len(fit_idx)
    if cfg.final_fit == "all" and len(te) and with_validation:
        everything = np.concatenate([tv, te])
        X_all, Y_all = _fit_rows(cfg, spec, rows, everything, timings)
        head = SigmoidHead(**{**params, "steps": cross.best_steps}, keep_best=False, seed=seed).fit(
            X_all, Y_all
        )
        fitted = len(everything)
        log.info(
            "Every labelled photo counts (--final_fit all): the final layer was fitted again on all %d images, the "
            "%d test images included; the test figures above were measured before, by a layer that had not seen "
            "them (--final_fit train+val keeps the test images out of the exported layer).",
            fitted,
            len(te),
        )

    metrics = {
        "kind": "multi_label",
        "labels": labels,
        "thresholds": [round(float(t), 6) for t in thresholds],
        "threshold_source": dict(zip(labels, sources)),
        "multi_label": {"validation": validation, "test": test},
        "validation_kind": "out-of-fold" if with_validation else "held-out",
        "test_count": int(len(te)),
        "best_step": int(head.best_step_),
        "train_count": int(len(tr)),
        "image_count": int(len(rows.paths)),
        "copies_merged": int(rows.copies),
        "final_fit": cfg.final_fit if with_validation else "train",
        "final_fit_count": int(fitted),
        "skipped_files": len(table.skipped),
        "seed": seed,
    }
    if cross is not None:
        metrics["crossfit"] = {
            "mAP": round(cross.map, 6),
            "best_steps": cross.best_steps,
            "folds": int(cross.fold.max()) + 1,
            "count": int(len(cross.fold)),
            "seconds": round(cross.seconds, 3),
            "curve_steps": cross.curve_steps,
            "curve_map": [round(m, 6) for m in cross.curve_map],
        }
    t0 = time.perf_counter()
    _export(cfg, spec, labels, head, thresholds, metrics, paths, rows)
    timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    atomic_write_bytes(paths.run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    if not cfg.no_report:
        from retrain.report import write_report

        try:
            log.info("Wrote the report %s", write_report(paths.run_dir))
        except RetrainError as exc:  # a report without the multi-label section cannot show this run
            log.warning("report.html not written: this report cannot show a multi-label run (%s)", exc)
    _link_latest(cfg, paths)
    return TrainResult(
        labels=labels,
        test_accuracy=None,
        test_count=int(len(te)),
        validation_accuracy=None,
        output_graph=paths.output_graph,
        output_labels=paths.output_labels,
        run_dir=paths.run_dir,
        metrics=metrics,
        skipped=table.skipped,
        config=cfg,
    )


@dataclass
class MLFit:
    """The final layer and its thresholds, with the held-out probabilities that chose them."""

    head: SigmoidHead
    cross: MLCrossFit | None
    with_validation: bool  # fitted on training + validation (steps from the cross-fit)
    fit_idx: np.ndarray  # the rows it was fitted on
    held_idx: np.ndarray  # rows with held-out probabilities: out-of-fold, or the validation split
    held_probs: np.ndarray
    thresholds: np.ndarray
    sources: list[str]  # per label: tuned, shared, flag or default


def fit_multi_label(
    cfg: TrainConfig,
    spec: BackboneSpec,
    rows: Rows,
    seed: int,
    *,
    paths=None,
    timings: dict | None = None,
) -> MLFit:
    """Cross-fit, final layer and thresholds on ``rows``' training + validation rows (the test rows are never
    looked at). ``paths`` (retrain.train.RunPaths): where TensorBoard's curves go (None: nowhere)."""
    timings = {} if timings is None else timings
    labels = rows.labels
    tv, tr, va = rows.where(TRAINING, VALIDATION), rows.where(TRAINING), rows.where(VALIDATION)
    params = head_params(cfg)

    cross = None
    if cfg.final_fit != "train":
        try:
            cross = ml_cross_fit(rows.X[tv], rows.Y[tv], rows.group[tv], params=params, seed=seed)
        except ValueError as exc:
            log.warning("No cross-fit (%s): the final layer trains on the training split", exc)
        timings["cross_fit"] = cross.seconds if cross is not None else 0.0
    with_validation = cross is not None
    if cross is not None:
        curve = ", ".join(f"{s}: {100 * m:.1f}%" for s, m in zip(cross.curve_steps, cross.curve_map))
        log.info(
            "Out-of-fold mAP by number of steps (N=%d, %d folds): %s", len(tv), cross.fold.max() + 1, curve
        )
        log.info(
            "Cross-fitting on %d training+validation images: best at %d steps (out-of-fold mAP %.1f%%, %.1f s); "
            "final layer fitted on all of them",
            len(tv),
            cross.best_steps,
            100 * cross.map,
            cross.seconds,
        )

    fit_idx = tv if with_validation else tr
    X_fit, Y_fit = _fit_rows(cfg, spec, rows, fit_idx, timings)
    head = SigmoidHead(
        **{**params, "steps": cross.best_steps if with_validation else params["steps"]},
        keep_best=not with_validation,
        seed=seed,
    )
    logger = _Logger(cfg, paths) if paths is not None else None
    if cross is not None and logger is not None:
        logger.out_of_fold(cross)
    t0 = time.perf_counter()
    try:
        head.fit(
            X_fit,
            Y_fit,
            X_val=None if with_validation else rows.X[va],
            Y_val=None if with_validation else rows.Y[va],
            eval_every=cfg.eval_step_interval,
            on_eval=logger,
        )
    finally:
        if logger is not None:
            logger.close()
    timings["train_head"] = time.perf_counter() - t0
    if not with_validation and len(va):
        log.info("Kept the weights of step %d (best validation mAP, N=%d)", head.best_step_, len(va))

    # Held-out probabilities: out-of-fold for training + validation, or the validation split's.
    held_idx = tv if with_validation else va
    held_probs = cross.probs if with_validation else head.predict_proba(rows.X[va])
    thresholds, sources = choose_thresholds(cfg, held_probs, rows.Y[held_idx], labels)
    return MLFit(head, cross, with_validation, fit_idx, held_idx, held_probs, thresholds, sources)


def head_params(cfg: TrainConfig) -> dict:
    """SigmoidHead keyword arguments (all but the seed) from the run's flags."""
    return dict(
        steps=cfg.how_many_training_steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.train_batch_size,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay or 0.0,  # None: the single-label cross-fit chooses it; none here
        class_balance=cfg.class_balance,
    )


# -- data ------------------------------------------------------------------------------------------------
def dataset_from_labels_file(cfg: TrainConfig) -> tuple[Dataset, dict[str, tuple[str, ...]]]:
    """The photos a ``--labels_file`` lists (one record each) and {path: labels}."""
    from retrain.images import is_image_file_name
    from retrain.labels_file import read_labels_file

    if not cfg.image_dir:
        raise ConfigError("--labels_file needs --image_dir: the folder its paths are relative to")
    root = Path(cfg.image_dir)
    if not root.is_dir():
        raise DatasetError(f"--image_dir {printable(str(root))!r} is not a folder")
    mapping = read_labels_file(cfg.labels_file, root)
    labels = sorted({label for names in mapping.values() for label in names})
    if len(labels) < 2:
        raise DatasetError(
            f"--labels_file {printable(cfg.labels_file)} names only {len(labels)} label(s) ({', '.join(labels)}); "
            "a multi-label model needs at least 2"
        )
    real = root.resolve()
    index = {label: i for i, label in enumerate(labels)}
    records = [
        ImageRecord(path=str(photo), rel_path=photo.relative_to(real).as_posix(), label_index=index[names[0]])
        for photo, names in sorted(mapping.items())
    ]
    notices = []
    listed = {str(p) for p in mapping}
    unlisted = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if is_image_file_name(name) and str(Path(dirpath, name).resolve()) not in listed:
                unlisted += 1
    if unlisted:
        notices.append(
            f"{unlisted} image file(s) under {printable(str(root))} are not in --labels_file; they are left out"
        )
    log.info("--labels_file %s: %d photos, %d labels", printable(cfg.labels_file), len(records), len(labels))
    return Dataset(root, labels, records, notices), {str(p): names for p, names in mapping.items()}


def build_rows(
    dataset: Dataset,
    table,
    file_labels: dict[str, tuple[str, ...]] | None = None,
    *,
    validation_percentage: float = 10,
    testing_percentage: float = 10,
) -> Rows:
    """One row per distinct readable image (files with the same content key are one photo; its labels are
    the union of theirs), its split from retrain.py's hash of the group's first name."""
    records = [r for r in dataset.records if r.path not in table.skipped]
    if not records:
        raise DatasetError("no readable images (every file was skipped, listed above)")
    index = {label: i for i, label in enumerate(dataset.labels)}
    keys = [table.keys[r.path] for r in records]
    gids = same_image_groups([r.rel_path for r in records], keys)
    by_key: dict[bytes, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    L = len(dataset.labels)
    first = [min(members, key=lambda i: records[i].rel_path) for members in by_key.values()]
    Y = np.zeros((len(by_key), L), bool)
    for row, members in enumerate(by_key.values()):
        for i in members:
            r = records[i]
            names = file_labels[r.path] if file_labels is not None else (dataset.labels[r.label_index],)
            Y[row, [index[n] for n in names]] = True
    # The split: one per group (copies, _nohash_ near-duplicates), from its first name's hash.
    group_name: dict[int, str] = {}
    for r, g in zip(records, gids):
        group_name[g] = min(group_name.get(g, r.rel_path), r.rel_path)
    split_of = {g: which_split(n, validation_percentage, testing_percentage) for g, n in group_name.items()}
    _fill_empty_splits(split_of, group_name, validation_percentage, testing_percentage)
    group = np.array([gids[i] for i in first], np.int64)
    present = Y.any(axis=0)
    if not present.all():  # every file of a label was unreadable
        for j in np.flatnonzero(~present):
            log.warning("label %r has no readable image; it is left out", printable(dataset.labels[j]))
        Y = Y[:, present]
    labels = [label for label, p in zip(dataset.labels, present) if p]
    if len(labels) < 2:
        raise DatasetError(f"need at least 2 labels with readable images, found {len(labels)}")
    return Rows(
        labels=labels,
        paths=[records[i].path for i in first],
        keys=[keys[i] for i in first],
        X=table.matrix([records[i].path for i in first]),
        Y=Y,
        split=np.array([split_of[g] for g in group], dtype="<U10"),
        group=group,
        copies=len(records) - len(first),
    )


def _fill_empty_splits(split_of: dict, group_name: dict, validation_percentage, testing_percentage) -> None:
    """With 3 or more groups, a wanted split the hash left empty takes the training group whose hash lies
    nearest (the lowest: training is the top of the hash line), as the single-label split does."""
    wanted = [s for s, pct in ((VALIDATION, validation_percentage), (TESTING, testing_percentage)) if pct > 0]
    if len(split_of) < 3:
        return
    for s in wanted:
        training = [g for g, v in split_of.items() if v == TRAINING]
        if s not in split_of.values() and len(training) > 1:
            split_of[min(training, key=lambda g: (hash_percentage(group_name[g]), group_name[g]))] = s


def _report_rows(rows: Rows) -> None:
    if rows.copies:
        log.info(
            "%d file(s) are copies of another photo (same content): each photo is one row with all its labels",
            rows.copies,
        )
    log.info("Found %d distinct images with %d labels", len(rows.paths), len(rows.labels))
    width = max(len(printable(label)) for label in rows.labels)
    log.info("%-*s  %8s %10s %7s", width, "label", "training", "validation", "testing")
    for j, label in enumerate(rows.labels):
        counts = [int(rows.Y[rows.split == s, j].sum()) for s in (TRAINING, VALIDATION, TESTING)]
        log.info("%-*s  %8d %10d %7d", width, printable(label), *counts)
    every = [label for j, label in enumerate(rows.labels) if rows.Y[:, j].all()]
    if every:
        log.warning(
            "label(s) %s are on every image: the model will always say them (add photos without them)",
            ", ".join(map(repr, every)),
        )
    all_labels = int(rows.Y.all(axis=1).sum())
    if all_labels and not every:
        log.info("%d image(s) carry every label", all_labels)
    if not len(rows.where(TESTING)):
        log.warning(
            "No test images (too few images or --testing_percentage 0): test metrics are not measured."
        )


def _fit_rows(cfg: TrainConfig, spec: BackboneSpec, rows: Rows, idx: np.ndarray, timings: dict):
    """(X, Y) the layer learns from: the rows' features, or with the distortion flags their distorted variants."""
    if cfg.flip_left_right or cfg.random_crop or cfg.random_scale or cfg.random_brightness:
        from retrain.distort import distorted_training_features
        from retrain.splits import Split

        t0 = time.perf_counter()
        # The variants come back image-major with the "label" repeated: here the row number.
        part = Split(
            rows.X[idx], np.arange(len(idx)), [rows.paths[i] for i in idx], [rows.keys[i] for i in idx]
        )
        X, which = distorted_training_features(part, spec, cfg)
        timings["distortions"] = timings.get("distortions", 0.0) + time.perf_counter() - t0
        return X, rows.Y[idx][which]
    return rows.X[idx], rows.Y[idx]


# -- cross-fit -------------------------------------------------------------------------------------------
def assign_folds(Y: np.ndarray, k: int, groups, seed: int = 0) -> np.ndarray:
    """A fold in [0, k) per row, groups kept whole, stratified by each group's rarest label."""
    gid = group_ids(groups, len(Y))
    n_groups = gid.max() + 1
    counts = Y.sum(axis=0)
    gY = np.zeros((n_groups, Y.shape[1]), bool)
    np.logical_or.at(gY, gid, Y)
    rare = np.where(gY, counts[None, :], np.inf).argmin(axis=1)  # each group's rarest label
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(n_groups), rare))
    fold_of_group = np.empty(n_groups, np.int64)
    fold_of_group[order] = np.arange(n_groups) % k
    return fold_of_group[gid]


def ml_cross_fit(
    X: np.ndarray,
    Y: np.ndarray,
    groups,
    *,
    params: dict,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    patience: int = PATIENCE,
    tolerance: float = MAP_TOLERANCE,
) -> MLCrossFit:
    """Out-of-fold probabilities for rows ``X`` (N, D), ``Y`` (N, L): ``folds`` sigmoid layers trained at
    once, scored at the step counts of retrain.crossfit.checkpoint_steps. The fewest steps whose out-of-fold
    mAP is within ``tolerance`` x (1 - the best) of the best seen are kept; the fits stop after ``patience``
    checkpoints in a row that did not raise the best mAP by more than that.

    Unlike the single-label accuracy, the mAP is a continuous score that keeps creeping up by hundredths of
    a point as the layer grows more confident; without the tolerance that noise keeps the fits running
    (and the final layer training) for 3x the steps of a single-label run for no measurable gain."""
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, np.float32)
    Y = np.asarray(Y, bool)
    n, d = X.shape
    k = min(folds, len(np.unique(group_ids(groups, n))))
    if n < 2 or k < 2:
        raise ValueError("cross-fitting needs at least 2 distinct images")
    fold = assign_folds(Y, k, groups, seed)
    held = [np.flatnonzero(fold == f) for f in range(k)]
    jobs = [(np.flatnonzero(fold != f), seed + 1000 * (f + 1)) for f in range(k)]
    marks = [int(m) for m in checkpoint_steps(params["steps"])]
    steps, maps, losses, probs_at = [], [], [], []
    last_gain = [0]  # the checkpoint that last raised the best mAP by more than the tolerance

    X_held = [X[rows] for rows in held]  # gathered once, not at every checkpoint

    def on_step(step: int, P: np.ndarray) -> bool:
        probs = np.empty(Y.shape, np.float32)
        for f, rows in enumerate(held):
            probs[rows] = sigmoid(X_held[f] @ P[f, :, :d].T + P[f, :, d])
        m = mean_average_precision(probs, Y) or 0.0
        if steps and m > max(maps) + tolerance * (1 - max(maps)):
            last_gain[0] = len(steps)
        steps.append(step)
        maps.append(m)
        losses.append(bce(probs, Y))
        probs_at.append(probs)
        for i, mi in enumerate(maps):  # keep only the probabilities that can still be chosen
            if mi < max(maps) - tolerance * (1 - max(maps)):
                probs_at[i] = None
        return len(steps) - 1 - last_gain[0] >= patience

    fit_sigmoid_layers(X, Y, jobs, every=marks, on_step=on_step, **params)
    top = max(maps)
    # The fewest steps within the tolerance of the best (ties: lower cross entropy).
    best = min(
        (i for i, m in enumerate(maps) if m >= top - tolerance * (1 - top) and probs_at[i] is not None),
        key=lambda i: (steps[i], losses[i]),
    )
    return MLCrossFit(probs_at[best], fold, steps, maps, losses, int(steps[best]), time.perf_counter() - t0)


# -- thresholds, results ------------------------------------------------------------------------------------
def choose_thresholds(
    cfg: TrainConfig, probs: np.ndarray, truth: np.ndarray, labels: list[str]
) -> tuple[np.ndarray, list[str]]:
    if cfg.multi_label_threshold is not None:
        log.info(
            "Decision threshold %.3g for every label (--multi_label_threshold)", cfg.multi_label_threshold
        )
        return np.full(len(labels), cfg.multi_label_threshold, np.float32), ["flag"] * len(labels)
    if not len(truth):
        log.warning("No held-out images to tune thresholds on: every label's threshold is 0.5")
        return np.full(len(labels), 0.5, np.float32), ["default"] * len(labels)
    thresholds, sources = tune_thresholds(probs, truth)
    shown = ", ".join(
        f"{printable(lab)} {t:.2f}{'' if s == 'tuned' else '*'}"
        for lab, t, s in zip(labels, thresholds, sources)
    )
    log.info(
        "Per-label thresholds (best example F1 on %d held-out images; * = shared, too few positives): %s",
        len(truth),
        shown,
    )
    return thresholds, sources


def _log_results(validation: dict | None, test: dict | None, out_of_fold: bool) -> None:
    def line(m: dict) -> str:
        ap = "n/a" if m["mAP"] is None else f"{100 * m['mAP']:.1f}%"
        return (
            f"mAP {ap}, example F1 {100 * m['example_f1']:.1f}% (at 0.5: {100 * m['example_f1_at_0.5']:.1f}%), "
            f"exact match {100 * m['exact_match']:.1f}% (N={m['n_images']})"
        )

    if validation is not None:
        log.info(
            "%s: %s", "Out-of-fold (training+validation)" if out_of_fold else "Validation", line(validation)
        )
    if test is not None:
        log.info("Final test: %s", line(test))
        for label, s in test["per_label"].items():
            f = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
            log.info(
                "  %-20s AP %s  P %s  R %s  F1 %s  (N=%d, threshold %.2f)",
                printable(label),
                f(s["ap"]),
                f(s["precision"]),
                f(s["recall"]),
                f(s["f1"]),
                s["support"],
                s["threshold"],
            )


def write_npz(path: Path, rows: Rows, held_idx, held_probs, test_idx, test_probs, thresholds) -> None:
    """The per-image results for the report: held-out (out-of-fold or validation) and test probabilities."""
    import io

    idx = np.concatenate([held_idx, test_idx]).astype(np.int64)
    probs = np.concatenate([held_probs, test_probs]).astype(np.float32)
    buf = io.BytesIO()
    np.savez(
        buf,
        paths=np.array([os.path.abspath(rows.paths[i]) for i in idx], dtype=str),
        truth=rows.Y[idx],
        probs=probs,
        labels=np.array(rows.labels, dtype=str),
        thresholds=np.asarray(thresholds, np.float32),
        split=rows.split[idx].astype(str),
    )
    atomic_write_bytes(path, buf.getvalue())


def _export(cfg, spec, labels, head, thresholds, metrics, paths, rows: Rows) -> None:
    """The model (sigmoid output, thresholds in its manifest), its labels, the serving folder, the quantized copy."""
    from retrain.export import classifier_model, save_model, write_labels, write_saved_model_dir

    model, manifest = classifier_model(
        spec,
        labels,
        head,
        model_dir=cfg.model_dir or None,
        output_name=cfg.final_tensor_name,
        metrics=metrics,
        thresholds=thresholds,
    )
    save_model(model, paths.output_graph)
    write_labels(labels, paths.output_labels)
    log.info("Wrote the model to %s and its labels to %s", paths.output_graph, paths.output_labels)
    if paths.saved_model_dir is not None:
        write_saved_model_dir(paths.saved_model_dir, model, manifest)
        log.info("Wrote the serving folder %s", paths.saved_model_dir)
    if cfg.quantize:
        from retrain.quantize import convert_file, converted_path, pick_calibration

        train_rows = rows.where(TRAINING)
        by_label: list[list[str]] = [[] for _ in labels]
        for i in train_rows:
            by_label[int(np.flatnonzero(rows.Y[i])[0])].append(rows.paths[i])
        out = converted_path(paths.output_graph, cfg.quantize)
        log.info("Writing the %s model %s ...", cfg.quantize, out)
        report = convert_file(
            paths.output_graph,
            cfg.quantize,
            out,
            calibration_paths=pick_calibration(by_label) if cfg.quantize == "int8" else (),
            eval_paths=[rows.paths[i] for i in rows.where(TESTING)],
        )
        log.info("%s", report.summary("test"))
        atomic_write_bytes(
            paths.run_dir / f"quantize_{cfg.quantize}.json", json.dumps(report.to_dict(), indent=2).encode()
        )
    atomic_write_bytes(paths.run_dir / "config.json", cfg.to_json().encode())


class _Logger:
    """Every evaluation step of the final layer: the log line and TensorBoard (train and validation runs)."""

    def __init__(self, cfg: TrainConfig, paths):
        from retrain.summaries import EventWriter, new_run_dirs

        train_dir, val_dir = new_run_dirs(paths.summaries_dir)
        self.train_writer, self.val_writer = EventWriter(train_dir), EventWriter(val_dir)
        self.histogram_every = histogram_interval(cfg.eval_step_interval, cfg.how_many_training_steps)
        self.history: dict[str, list] = defaultdict(list)

    def __call__(self, r: MLStep, head: SigmoidHead) -> None:
        val = (
            f", Validation mAP = {100 * r.validation_map:.1f}% (N={r.validation_count})"
            if r.validation_map is not None
            else ""
        )
        log.info(
            "Step %d: Train example F1 (at 0.5) = %.1f%%, Cross entropy = %.6f%s",
            r.step,
            100 * r.train_f1,
            r.cross_entropy,
            val,
        )
        self.train_writer.scalars({"example_f1": r.train_f1, "cross_entropy": r.cross_entropy}, r.step)
        if r.step % self.histogram_every == 0 or r.step == head.steps:
            head_histograms(self.train_writer, head, r.step)
        if r.validation_map is not None:
            self.val_writer.scalars(
                {"mAP": r.validation_map, "cross_entropy": r.validation_cross_entropy}, r.step
            )

    def out_of_fold(self, cross: MLCrossFit) -> None:
        """TensorBoard's validation curve when nothing is held out: the cross-fit's out-of-fold scores."""
        for step, m, loss in zip(cross.curve_steps, cross.curve_map, cross.curve_loss):
            self.val_writer.scalars({"mAP": float(m), "cross_entropy": float(loss)}, int(step))

    def close(self) -> None:
        self.train_writer.close()
        self.val_writer.close()
