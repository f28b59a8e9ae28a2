"""The whole run: discover -> features (cache) -> split -> fit head [-> fine-tune] -> test -> export -> metrics.

``train()`` is the library entry point; the ``retrain`` command parses flags and calls it. Each
step is a function with explicit inputs and outputs (the same ones a Python user can call one by
one: ``extract_features``, ``split_features``, ``SoftmaxHead.fit``, ``fine_tune``, ``export_model``);
``train()`` strings them together and owns what a run adds around them: the run folder and its
paths, timings, logging, checkpoints and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.audit import accuracy_line, classification_metrics
from retrain.backbones import BackboneSpec, get_backbone
from retrain.cache import atomic_write_bytes
from retrain.config import TrainConfig
from retrain.crossfit import CrossFit
from retrain.data import TESTING, TRAINING, VALIDATION, Dataset, discover, printable
from retrain.errors import RetrainError, SkippedFilesError
from retrain.features import FeatureTable, extract_features
from retrain.head import SoftmaxHead, StepReport
from retrain.splits import Split, Splits, split_features
from retrain.summaries import head_histograms, histogram_interval

log = logging.getLogger("retrain")

# Written last, when everything else is: a run folder that has it finished, and --resume leaves it alone.
FINISHED_MARKER = "metrics.json"


@dataclass
class TrainResult:
    """What a run produced. ``metrics`` holds accuracies; paths point at the written files."""

    labels: list[str]
    test_accuracy: float | None
    test_count: int
    validation_accuracy: float | None
    output_graph: Path
    output_labels: Path
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    misclassified: list[tuple[str, str]] = field(default_factory=list)
    config: TrainConfig | None = None
    cross_fit: CrossFit | None = None  # out-of-fold predictions for the training + validation images


@dataclass
class TestReport:
    """The head on the test split: accuracy (None without test images), images counted, the misclassified."""

    accuracy: float | None
    count: int
    misclassified: list[tuple[str, str]]  # (path, predicted label)
    metrics: dict | None = None  # audit.classification_metrics: per class, intervals, confusion matrix


@dataclass
class RunPaths:
    run_dir: Path
    output_graph: Path
    output_labels: Path
    summaries_dir: Path
    checkpoint: Path
    intermediate_dir: Path
    saved_model_dir: Path | None


def train(
    image_dir: str | os.PathLike | None = None, config: TrainConfig | None = None, **overrides
) -> TrainResult:
    """Retrain a classifier on a folder of class sub-folders and export it.

    ``train("photos", how_many_training_steps=500)`` is the same as
    ``retrain --image_dir photos --how_many_training_steps 500``.

    Each step below is one call with explicit data in and out; a further step (another head fit,
    calibration, a report) goes in as one more call between them, with its timing and files here.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if image_dir is not None:
        cfg.image_dir = os.fspath(image_dir)
    cfg.validate()  # every value, before any work
    if cfg.quality == "best":  # the fine-tuning recipe's settings; finetune.py imports torch, which a run
        from retrain.finetune import (
            apply_quality,
        )  # without fine-tuning never needs (seconds of a warm rerun)

        cfg = apply_quality(cfg)
    t_start = time.perf_counter()
    spec = resolve_backbone(cfg)
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}  # CPU seconds, all threads
    if cfg.multi_label or cfg.labels_file:  # one sigmoid output per label: its own stages
        from retrain.multilabel import train_multi_label

        if not cfg.multi_label:
            log.info("--labels_file: several labels per photo, as with --multi_label")
        return train_multi_label(dataclasses.replace(cfg, multi_label=True), spec, seed, t_start)

    dataset = _discover(cfg)
    # After discovery, so that a bad --image_dir leaves no empty run folder behind.
    paths = _resolve_paths(cfg, reserve=True)
    _check_writable(paths, cfg)
    best_mode = cfg.quality == "best"
    if best_mode:  # --quality best: the time estimate first (retrain.quality)
        from retrain import quality

        quality.log_estimate(cfg, len(dataset.records), chooses=not quality.why_not_choose(cfg))
    table = _features(cfg, spec, dataset)
    if best_mode:  # the backbone whose features cross-fit best on training + validation
        t0 = time.perf_counter()
        spec, table, choice = quality.choose_backbone(cfg, dataset, spec, table, seed)
        cfg = dataclasses.replace(cfg, architecture=spec.name)
        timings["choose_backbone"] = time.perf_counter() - t0
    timings["features"], cpu_timings["features"] = table.seconds, table.cpu_seconds
    splits = split_features(
        dataset,
        table,
        validation_percentage=cfg.validation_percentage,
        testing_percentage=cfg.testing_percentage,
    )
    _report_split(splits.dataset, already_said=len(dataset.notices))

    history: dict[str, list] = defaultdict(list)  # the training curves, for the report
    # One cross-fit on training + validation per run: it chooses the final layer's steps, and its
    # out-of-fold predictions serve calibration, the unknown score and the audit.
    cpu0 = time.process_time()
    plan = _plan_final_fit(cfg, splits, seed, timings)
    cpu_timings["cross_fit"] = time.process_time() - cpu0
    crossfit = plan.cross
    cfg = dataclasses.replace(
        cfg, weight_decay=plan.weight_decay
    )  # the flag's value or the cross-fit's choice
    frozen = splits  # bottleneck features, before any fine-tuning: what the audit compares
    resolved = False  # best mode: the layer solved again on the fine-tuned backbone's features
    cpu0 = time.process_time()
    head = _fit_head(cfg, spec, seed, splits, paths, timings, history, plan)
    cpu_timings["train_head"] = time.process_time() - cpu0
    validation_accuracy = (
        plan.validation_accuracy if plan.with_validation else _validation_accuracy(head, splits.validation)
    )
    backbone_onnx = None
    if cfg.fine_tune:
        from retrain.finetune import fine_tune

        t0 = time.perf_counter()
        tuned = fine_tune(
            head,
            splits,
            architecture=spec,
            config=cfg,
            seed=seed,
            checkpoint=_finetune_checkpoint(paths.checkpoint),
            summaries_dir=paths.summaries_dir,
        )
        timings["fine_tune"] = time.perf_counter() - t0
        atomic_write_bytes(paths.run_dir / "fine_tune.json", json.dumps(tuned.report(), indent=2).encode())
        if tuned.backbone_onnx is not None:
            head, backbone_onnx, splits = tuned.head, tuned.backbone_onnx, tuned.splits
            validation_accuracy = _validation_accuracy(head, splits.validation, log_it=False)
    elif best_mode:  # fine-tuning, kept only if it beats this frozen model on validation
        t0 = time.perf_counter()
        best = quality.fine_tune_or_keep(
            cfg,
            spec,
            seed,
            splits,
            plan,
            head,
            checkpoint=_finetune_checkpoint(paths.checkpoint),
            summaries_dir=paths.summaries_dir,
        )
        timings["fine_tune"] = time.perf_counter() - t0
        best.report["backbone_choice"] = choice.to_dict()
        atomic_write_bytes(paths.run_dir / "fine_tune.json", json.dumps(best.report, indent=2).encode())
        if best.backbone_onnx is not None:
            head, backbone_onnx, splits = best.head, best.backbone_onnx, best.splits
            validation_accuracy = _validation_accuracy(head, splits.validation, log_it=False)
            if plan.c is not None and _same_rows(splits, frozen):
                # The fine-tuned backbone's features get the default run's layer: a cross-fit on them chooses C
                # (its out-of-fold logits then set the temperature and the unknown threshold), the layer is
                # solved on training + validation, tested, and (--final_fit all) solved again with the test
                # images. On textures this gave +2.6 points over keeping the fine-tuned layer (docs/finetune.md).
                log.info("best quality: the new layer is solved again on the fine-tuned backbone's features")
                plan = _plan_final_fit(cfg, splits, seed, timings)
                crossfit = plan.cross
                head = _fit_head(cfg, spec, seed, splits, paths, timings, history, plan)
                validation_accuracy = plan.validation_accuracy
                resolved = True

    test = evaluate(
        head,
        splits.test,
        splits.labels,
        test_batch_size=cfg.test_batch_size,
        seed=seed,
        print_misclassified=cfg.print_misclassified_test_images,
    )
    tested = head  # the layer the test accuracy describes
    fitted_count = len(splits.train.y) + (len(splits.validation.y) if plan.with_validation else 0)
    final_fit = plan.mode
    # A fine-tuned layer (fitted on the training split) belongs with its backbone, and its validation images
    # judge its temperature: it is exported as it is, its test images not folded in.
    keeps_tuned_layer = backbone_onnx is not None and not resolved
    if keeps_tuned_layer:
        fitted_count, final_fit = len(splits.train.y), "train"
    if plan.mode == "all" and test.count and keeps_tuned_layer:
        log.info("--final_fit all: the fine-tuned model keeps its layer; the test images are not folded in")
    elif plan.mode == "all" and test.count:
        from retrain.fit import log_refit_with_test

        head = _refit_with_test(cfg, spec, seed, splits, plan, timings)
        fitted_count += len(splits.test.y)
        log_refit_with_test(test.accuracy, fitted_count, len(splits.test.y))
    # Out-of-fold predictions describe the features they were made on: fine-tuning replaced the frozen ones
    # (best mode then made new ones, on the fine-tuned features).
    cross = None if keeps_tuned_layer else crossfit
    open_world = _open_world(
        cfg,
        splits,
        head,
        seed,
        cross,
        head_like_folds=plan.with_validation,
        tested=tested,
        solved_c=None if keeps_tuned_layer else plan.c,
    )
    timings["open_world"] = open_world.seconds
    metrics = {
        "test_accuracy": test.accuracy,
        "test_count": test.count,
        "validation_accuracy": validation_accuracy,
        "validation_kind": "out-of-fold" if plan.with_validation else "held-out",
        "best_step": getattr(head, "best_step_", None),
        "head_solver": "lbfgs" if plan.c is not None else "steps",
        "train_count": len(splits.train.y),
        "final_fit": final_fit,
        "final_fit_count": fitted_count,
        "weight_decay": plan.weight_decay,
        "skipped_files": len(table.skipped),
        "seed": seed,
        "test": test.metrics,
        **open_world.metrics(),
    }
    if crossfit is not None:
        metrics["crossfit"] = {
            "accuracy": crossfit.accuracy,
            "best_steps": crossfit.best_steps if crossfit.c is None else None,
            **_l2_path(crossfit),
            "folds": int(crossfit.fold.max()) + 1,
            "count": len(crossfit.fold),
            "seconds": round(crossfit.seconds, 3),
            "weight_decay": crossfit.weight_decay,
            "weight_decay_accuracy": {f"{d:g}": a for d, a in crossfit.decay_accuracy.items()},
        }
    report = crossfit is not None and not cfg.no_report
    if report:
        t0 = time.perf_counter()
        metrics["audit"] = _audit(
            cfg, frozen, crossfit, tested, splits.test, table.skipped, history, seed, paths
        )
        timings["audit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _export(cfg, spec, splits.dataset, head, metrics, backbone_onnx, paths, open_world)
    timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["cpu_seconds"] = {k: round(v, 3) for k, v in cpu_timings.items()}
    atomic_write_bytes(paths.run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    if report:
        from retrain.report import write_report

        log.info("Wrote the report %s", write_report(paths.run_dir))
    _link_latest(cfg, paths)
    return TrainResult(
        labels=splits.labels,
        test_accuracy=test.accuracy,
        test_count=test.count,
        validation_accuracy=validation_accuracy,
        output_graph=paths.output_graph,
        output_labels=paths.output_labels,
        run_dir=paths.run_dir,
        metrics=metrics,
        skipped=table.skipped,
        misclassified=test.misclassified,
        config=cfg,
        cross_fit=crossfit,
    )


def resolve_backbone(cfg: TrainConfig) -> BackboneSpec:
    name = cfg.architecture
    if cfg.tfhub_module:
        name = cfg.tfhub_module
    return get_backbone(name)


def _resolve_paths(cfg: TrainConfig, *, reserve: bool = False) -> RunPaths:
    """Where each output goes; ``reserve`` creates the default run folder, so that two runs
    started in the same second can never pick the same one."""
    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    elif cfg.resume and not cfg.checkpoint_path and (last := _last_unfinished_run(Path("retrain_runs"))):
        run_dir = last  # --resume alone continues the interrupted run instead of starting a new folder
    else:
        if cfg.resume and not cfg.checkpoint_path and reserve:
            log.info("--resume: no unfinished run under retrain_runs; starting a new one")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("retrain_runs") / stamp
        n = 1
        while _taken(run_dir, reserve):
            n += 1
            run_dir = Path("retrain_runs") / f"{stamp}-{n}"

    def pick(value: str, default: Path) -> Path:
        return Path(value) if value else default

    return RunPaths(
        run_dir=run_dir,
        output_graph=pick(cfg.output_graph, run_dir / "output_graph.onnx"),
        output_labels=pick(cfg.output_labels, run_dir / "output_labels.txt"),
        summaries_dir=pick(cfg.summaries_dir, run_dir / "summaries"),
        checkpoint=pick(cfg.checkpoint_path, run_dir / "checkpoint.npz"),
        intermediate_dir=pick(cfg.intermediate_output_graphs_dir, run_dir / "intermediate"),
        saved_model_dir=Path(cfg.saved_model_dir) if cfg.saved_model_dir else None,
    )


def _last_unfinished_run(root: Path) -> Path | None:
    """The unfinished run folder under ``root`` whose checkpoint was written last: the one an interruption left.

    (``root/latest`` moves only when a run finishes, so it cannot name an interrupted run. A folder
    with the ``FINISHED_MARKER`` is a finished run: continuing it would overwrite its outputs.)
    """
    found = [
        (f.stat().st_mtime, f.parent)
        for pattern in ("*/checkpoint.npz", "*/checkpoint-finetune.pt")
        for f in root.glob(pattern)
        if not f.parent.is_symlink() and not (f.parent / FINISHED_MARKER).exists()
    ]
    return max(found)[1] if found else None


def _taken(run_dir: Path, reserve: bool) -> bool:
    if not reserve:
        return run_dir.exists()
    try:
        run_dir.mkdir(parents=True)  # atomic: fails if another run took the name first
    except FileExistsError:
        return True
    except OSError:
        pass  # unwritable: _check_writable says so, with the fix
    return False


def _check_writable(paths: RunPaths, cfg: TrainConfig) -> None:
    """Fail before the long work if an output location cannot be written."""
    folders = {
        paths.run_dir,
        paths.output_graph.parent,
        paths.output_labels.parent,
        paths.summaries_dir,
        paths.checkpoint.parent,
    }
    if cfg.intermediate_store_frequency > 0:
        folders.add(paths.intermediate_dir)
    if paths.saved_model_dir is not None:
        folders.add(paths.saved_model_dir.parent)
    for folder in sorted(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".retrain-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RetrainError(
                f"cannot write to {printable(str(folder))!r} ({exc.strerror or exc}). "
                "Choose a writable location for the outputs (e.g. --output_dir DIR)."
            ) from None


# -- the steps of a run, in order ---------------------------------------------------------------------
def _discover(cfg: TrainConfig) -> Dataset:
    if not cfg.image_dir:
        from retrain.sample_data import sample_image_dir

        cfg.image_dir = str(sample_image_dir())
        log.info("No --image_dir given: training on the bundled sample photos in %s", cfg.image_dir)
    dataset = discover(cfg.image_dir)
    for notice in dataset.notices:
        log.warning("%s", notice)
    log.info(
        "Found %d images in %d classes under %s",
        len(dataset.records),
        len(dataset.labels),
        printable(str(dataset.image_dir)),
    )
    return dataset


def _features(cfg: TrainConfig, spec: BackboneSpec, dataset: Dataset) -> FeatureTable:
    if cfg.engine == "ray" or cfg.extraction_precision != "float32":  # Ray cluster / int8 backbone
        from retrain.distributed import features_for_run

        table = features_for_run(cfg, spec, dataset)
    else:
        table = extract_features(
            dataset,
            architecture=spec,
            bottleneck_dir=cfg.bottleneck_dir,
            model_dir=cfg.model_dir or None,
            device=cfg.device,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            progress=not cfg.quiet,
        )
    rate = table.computed / table.seconds if table.seconds and table.computed else 0.0
    where = printable(str(table.store.directory))
    if table.computed:
        log.info(
            "Bottlenecks: %d computed in %.1f s (%.1f images/s), %d reused from the cache in %s",
            table.computed,
            table.seconds,
            rate,
            table.cached,
            where,
        )
    else:
        log.info("Bottlenecks: all %d reused from the cache in %s", table.cached, where)
    _report_skipped(table, strict=cfg.strict)
    if not cfg.multi_label:  # with --multi_label, a photo in several class folders carries each label
        _report_duplicates(dataset, table)
    return table


def _report_skipped(table: FeatureTable, *, strict: bool) -> None:
    for path, reason in sorted(table.skipped.items()):
        log.warning("Skipped %s: %s", printable(path), reason)
    if table.skipped:
        log.warning("Skipped %d file(s) that could not be used (listed above).", len(table.skipped))
        if strict:
            raise SkippedFilesError(
                f"--strict: {len(table.skipped)} file(s) could not be used (listed above); "
                "fix or remove them, or run without --strict to skip them."
            )


def _report_duplicates(dataset: Dataset, table: FeatureTable) -> None:
    classes_of: dict[bytes, set[int]] = defaultdict(set)
    example: dict[bytes, list[str]] = defaultdict(list)
    for r in dataset.records:
        key = table.keys.get(r.path)
        if key is not None:
            classes_of[key].add(r.label_index)
            example[key].append(r.rel_path)
    for key, classes in classes_of.items():
        if len(classes) > 1:
            names = ", ".join(printable(p) for p in example[key])
            log.warning(
                "The same image is in %d classes: %s (if a photo can carry several labels, train with "
                "--multi_label)",
                len(classes),
                names,
            )


def _report_split(dataset: Dataset, *, already_said: int) -> None:
    """The split's notices (those discovery did not already log) and the per-class counts table."""
    for notice in dataset.notices[already_said:]:
        log.warning("%s", notice)
    counts = dataset.counts()
    width = max(len(printable(label)) for label in dataset.labels)
    log.info("%-*s  %8s %10s %7s", width, "class", "training", "validation", "testing")
    for label, c in counts.items():
        log.info("%-*s  %8d %10d %7d", width, printable(label), c[TRAINING], c[VALIDATION], c[TESTING])


def head_params(cfg: TrainConfig) -> dict:
    """SoftmaxHead keyword arguments of the final layer (all but the seed), for it and its cross-fits."""
    return dict(
        steps=cfg.how_many_training_steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.train_batch_size,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay or 0.0,  # None (to be chosen) until the cross-fit chose it
        class_balance=cfg.class_balance,
    )


def _same_rows(a: Splits, b: Splits) -> bool:
    """Whether each split of ``a`` has one feature row per image, as ``b``'s (no distorted copies), so that
    a cross-fit over ``a`` lines up with ``b``'s rows."""
    return all(
        len(x.X) == len(y.X) == len(y.y)
        for x, y in zip((a.train, a.validation, a.test), (b.train, b.validation, b.test))
    )


def _l2_path(cross) -> dict:
    """The L-BFGS cross-fit's C values, out-of-fold accuracies and cross entropies (C's criterion), for
    metrics.json and the report."""
    if cross.c is None:
        return {}
    return {
        "C": cross.c,
        "curve_C": [float(c) for c in cross.curve_c],
        "curve_accuracy": cross.curve_accuracy.tolist(),
        "curve_cross_entropy": cross.curve_loss.tolist(),
    }


STEP_FLAGS = (
    "how_many_training_steps",
    "learning_rate",
    "train_batch_size",
    "eval_step_interval",
    "optimizer",
)


def _say_unused_step_flags(cfg: TrainConfig, mode: str) -> None:
    """A step flag given for the solved layer is not silently ignored: the log names it."""
    if cfg.head_solver != "lbfgs" or mode == "train":
        return
    given = [
        f"--{name} {getattr(cfg, name)}"
        for name in STEP_FLAGS
        if getattr(cfg, name) != getattr(TrainConfig, name)
    ]
    if given:
        log.info(
            "%s: for a layer trained by steps (--head_solver steps, or --final_fit train as in retrain.py); the "
            "default layer is solved, its regularisation chosen by the cross-fit",
            ", ".join(given),
        )


def _plan_final_fit(cfg: TrainConfig, splits: Splits, seed: int, timings: dict[str, float]):
    """The run's one cross-fit over training + validation and what the final layer is fitted on (retrain.fit)."""
    from retrain.fit import WEIGHT_DECAYS, labelled_groups, plan_final_fit

    mode = cfg.final_fit
    if cfg.fine_tune and mode != "train":
        log.info(
            "--fine_tune: the new layer is fitted on the training split, so that the validation split can "
            "judge the fine-tuning epochs (--final_fit %s applies without --fine_tune)",
            mode,
        )
        mode = "train"
    _say_unused_step_flags(cfg, mode)
    labelled = splits.train + splits.validation
    # Without --weight_decay the cross-fit chooses it, except for retrain.py's way (and fine-tuning): none.
    decays = (WEIGHT_DECAYS if mode != "train" else (0.0,)) if cfg.weight_decay is None else None
    plan = plan_final_fit(
        labelled.X,
        labelled.y,
        labelled_groups(labelled.keys, labelled.paths),
        n_classes=len(splits.labels),
        head_params=head_params(cfg),
        mode=mode,
        seed=seed,
        weight_decays=decays,
        solver=cfg.head_solver,
    )
    timings["cross_fit"] = plan.cross.seconds if plan.cross is not None else 0.0
    return plan


def _audit(
    cfg: TrainConfig,
    frozen: Splits,
    crossfit,
    head,
    test: Split,
    skipped: dict[str, str],
    history: dict[str, list],
    seed: int,
    paths: RunPaths,
) -> dict:
    """Label issues, duplicates and the learning curve (retrain.runaudit) from arrays the run holds.

    Training and validation images are scored out-of-fold, test images by the final layer: every
    image by a layer that never saw it."""
    from retrain.runaudit import RunData, audit_run

    parts = [frozen.train, frozen.validation, frozen.test]
    test_proba = head.predict_proba(test.X) if len(test.y) else np.zeros((0, len(frozen.labels)), np.float32)
    data = RunData(
        image_dir=os.path.abspath(frozen.dataset.image_dir),
        labels=frozen.labels,
        paths=[os.path.abspath(p) for s in parts for p in s.paths],
        split=[name for name, s in zip((TRAINING, VALIDATION, TESTING), parts) for _ in s.y],
        y=np.concatenate([s.y for s in parts]),
        keys=[k for s in parts for k in s.keys],
        X=np.concatenate([s.X for s in parts]),
        proba=np.concatenate([crossfit.proba, test_proba]),
        fold=np.concatenate([crossfit.fold, np.full(len(test.y), -1)]),
        head_params=head_params(cfg),
        seed=seed,
        solved_c=crossfit.c,
        train_count=len(frozen.train.y),
        skipped=skipped,
        history=dict(history),
    )
    return audit_run(data, paths.run_dir)


def _fit_rows(cfg: TrainConfig, spec: BackboneSpec, rows: Split, timings: dict[str, float]):
    """(X, y) the layer learns from: ``rows``' features, or their distorted variants with the distortion flags."""
    if cfg.flip_left_right or cfg.random_crop or cfg.random_scale or cfg.random_brightness:
        from retrain.distort import distorted_training_features

        t0 = time.perf_counter()
        X, y = distorted_training_features(rows, spec, cfg)
        timings["distortions"] = time.perf_counter() - t0
        return X, y
    return rows.X, rows.y


def _fit_head(
    cfg: TrainConfig,
    spec: BackboneSpec,
    seed: int,
    splits: Splits,
    paths: RunPaths,
    timings: dict[str, float],
    history: dict[str, list] | None,
    plan,
) -> SoftmaxHead:
    """The new layer as ``plan`` (retrain.fit.FitPlan) says: on training + validation for the cross-fit's
    number of steps, or on training alone keeping its best step on validation (retrain.py's way)."""
    train = splits.train + splits.validation if plan.with_validation else splits.train
    val = None if plan.with_validation else splits.validation
    X_train, y_train = _fit_rows(cfg, spec, train, timings)
    if plan.c is not None:  # --head_solver lbfgs: no steps to log, snapshot or resume
        if cfg.summaries_dir:
            log.info("TensorBoard: the L-BFGS layer has no training curve (--head_solver steps writes one)")
        t0 = time.perf_counter()
        head = _solve_head(cfg, X_train, y_train, len(splits.labels), plan.weight_decay)
        timings["train_head"] = time.perf_counter() - t0
        return head
    head = SoftmaxHead(**{**head_params(cfg), "steps": plan.steps}, seed=seed)

    def snapshot(step: int, head: SoftmaxHead) -> None:
        from retrain.export import classifier_model, save_model

        model, _ = classifier_model(
            spec,
            splits.labels,
            head,
            model_dir=cfg.model_dir or None,
            output_name=cfg.final_tensor_name,
            metrics={"step": step},
        )
        path = paths.intermediate_dir / f"intermediate_{step}.onnx"
        save_model(model, path)
        log.info("Saved intermediate model %s", path)

    logger = _TrainingLogger(
        cfg, splits.labels, paths, snapshot, _head_fingerprint(cfg, spec, train, len(y_train)), history
    )
    if plan.with_validation:
        logger.out_of_fold(plan.cross)
    resume_state = logger.load_checkpoint() if cfg.resume else None
    t0 = time.perf_counter()
    try:
        head.fit(
            X_train,
            y_train,
            n_classes=len(splits.labels),
            X_val=None if val is None else val.X,
            y_val=None if val is None else val.y,
            eval_every=max(1, cfg.eval_step_interval),
            validation_batch_size=cfg.validation_batch_size,
            on_eval=logger,
            resume_state=resume_state,
        )
    finally:
        logger.close()
    timings["train_head"] = time.perf_counter() - t0
    return head


def _refit_with_test(
    cfg: TrainConfig, spec: BackboneSpec, seed: int, splits: Splits, plan, timings: dict[str, float]
) -> SoftmaxHead:
    """``--final_fit all``'s last fit: every labelled image, test included, as ``plan`` says (its steps,
    or its C for the L-BFGS layer)."""
    rows = splits.train + splits.validation + splits.test
    X, y = _fit_rows(cfg, spec, rows, timings)
    t0 = time.perf_counter()
    if plan.c is not None:
        head = _solve_head(cfg, X, y, len(splits.labels), plan.l2_for(len(rows.y)))
    else:
        head = SoftmaxHead(**{**head_params(cfg), "steps": plan.steps}, keep_best=False, seed=seed).fit(
            X, y, n_classes=len(splits.labels)
        )
    timings["refit_with_test"] = time.perf_counter() - t0
    return head


def _solve_head(cfg: TrainConfig, X, y, n_classes: int, l2: float):
    """The L-BFGS layer (retrain.logreg) at strength ``l2`` on rows ``X``, ``y``."""
    from retrain.logreg import LogisticHead

    t0 = time.perf_counter()
    head = LogisticHead(l2=l2, balanced=cfg.class_balance == "weight").fit(X, y, n_classes=n_classes)
    log.info(
        "Final layer solved on %d images: %d L-BFGS iterations, %.2f s",
        len(y),
        head.n_iter_,
        time.perf_counter() - t0,
    )
    return head


def _head_fingerprint(cfg: TrainConfig, spec: BackboneSpec, train: Split, rows: int) -> dict:
    """What a head checkpoint must agree on to be continued, by flag name (the labels are checked on their own)."""
    images = hashlib.sha1(b"".join(train.keys) + np.ascontiguousarray(train.y).tobytes()).hexdigest()
    return {
        "architecture": spec.name,
        "weights": spec.weights_id,
        "optimizer": cfg.optimizer,
        "learning_rate": float(cfg.learning_rate),
        "train_batch_size": int(cfg.train_batch_size),
        "weight_decay": float(cfg.weight_decay),
        "class_balance": cfg.class_balance,
        "eval_step_interval": max(1, cfg.eval_step_interval),
        "flip_left_right": bool(cfg.flip_left_right),
        "random_crop": float(cfg.random_crop),
        "random_scale": float(cfg.random_scale),
        "random_brightness": float(cfg.random_brightness),
        "training_rows": int(rows),  # images x distorted copies
        "training_images": images,
    }


def _validation_accuracy(head, val: Split, *, log_it: bool = True) -> float | None:
    if not len(val.y):
        return None
    accuracy = float((head.predict(val.X) == val.y).mean())
    if log_it and hasattr(head, "best_step_"):
        log.info(
            "Kept the weights of step %d (best validation accuracy %.1f%%, N=%d)",
            head.best_step_,
            100 * accuracy,
            len(val.y),
        )
    elif log_it:  # the solved layer has no steps to pick from
        log.info("Validation accuracy = %.1f%% (N=%d)", 100 * accuracy, len(val.y))
    return accuracy


def evaluate(
    head,
    test: Split,
    labels: list[str],
    *,
    test_batch_size: int = -1,
    seed: int = 0,
    print_misclassified: bool = False,
) -> TestReport:
    """``head``'s accuracy on the test split (a random ``test_batch_size`` of it when > 0), logged."""
    if not len(test.y):
        log.warning(
            "No test images (every class is too small or --testing_percentage is 0): test accuracy "
            "is not measured."
        )
        return TestReport(None, 0, [])
    idx = np.arange(len(test.y))
    if 0 < test_batch_size < len(idx):
        idx = np.random.default_rng(seed + 2).choice(idx, size=test_batch_size, replace=False)
    pred = head.predict(test.X[idx])
    acc = float((pred == test.y[idx]).mean())
    log.info("Final test accuracy = %s", accuracy_line(int((pred == test.y[idx]).sum()), len(idx)))
    wrong = [(test.paths[i], labels[p]) for i, p in zip(idx, pred) if p != test.y[i]]
    if print_misclassified:
        log.info("=== MISCLASSIFIED TEST IMAGES ===")
        for path, label in wrong:
            log.info("%70s  %s", printable(path), printable(label))
    return TestReport(acc, len(idx), wrong, classification_metrics(test.y[idx], pred, labels))


def _open_world(
    cfg: TrainConfig,
    splits: Splits,
    head,
    seed: int,
    cross=None,
    *,
    head_like_folds: bool = False,
    tested=None,
    solved_c: float | None = None,
):
    """Temperature and unknown score (retrain/openworld.py) for the final ``head``; the test figures are
    those of ``tested``, the layer the test accuracy describes (``head`` itself unless --final_fit all).

    ``head_like_folds``: the final layer was fitted as the folds were (training + validation, the
    cross-fit's steps), so the out-of-fold logits choose its temperature; otherwise (fitted on the
    training split alone) its own validation logits do. ``solved_c``: ``head`` is the L-BFGS layer at that C,
    and the leave-one-class-out layers are solved as it was."""
    from retrain.openworld import fit_open_world, held_out_inputs

    held_out = held_out_inputs(
        splits.train, splits.validation, head, cross=cross, head_like_folds=head_like_folds, seed=seed
    )
    return fit_open_world(
        labels=splits.labels,
        **held_out,
        coef=head.coef_,
        intercept=head.intercept_,
        X_test=splits.test.X,
        y_test=splits.test.y,
        calibration=cfg.calibration,
        unknown_threshold=cfg.unknown_threshold,
        test_layer=None if tested is None or tested is head else (tested.coef_, tested.intercept_),
        # The final layer's settings and step count, for the leave-one-class-out refits.
        head_params={
            **head_params(cfg),
            "steps": max(1, getattr(head, "best_step_", None) or cfg.how_many_training_steps),
        },
        seed=seed,
        solved_c=solved_c,
        balanced=cfg.class_balance == "weight",
    )


def _export(
    cfg: TrainConfig,
    spec: BackboneSpec,
    dataset: Dataset,
    head,
    metrics: dict,
    backbone_onnx,
    paths: RunPaths,
    open_world=None,
) -> None:
    """The model, its labels, the serving folder, the quantized copy and ``config.json``."""
    from retrain.export import classifier_model, save_model, write_labels, write_saved_model_dir

    model, manifest = classifier_model(
        spec,
        dataset.labels,
        head,
        backbone_onnx=backbone_onnx,
        model_dir=cfg.model_dir or None,
        output_name=cfg.final_tensor_name,
        metrics=metrics,
        open_world=open_world,
    )
    if (
        cfg.extraction_precision != "float32" and backbone_onnx is None
    ):  # the backbone the layer was trained on
        from retrain.precision import with_extraction_backbone

        model, manifest = with_extraction_backbone(model, manifest, spec, cfg, head, open_world)
    save_model(model, paths.output_graph)
    write_labels(dataset.labels, paths.output_labels)
    log.info("Wrote the model to %s and its labels to %s", paths.output_graph, paths.output_labels)
    if paths.saved_model_dir is not None:
        write_saved_model_dir(paths.saved_model_dir, model, manifest)
        log.info("Wrote the serving folder %s", paths.saved_model_dir)
    if cfg.quantize:
        from retrain.quantize import quantize_after_training

        report = quantize_after_training(
            paths.output_graph, cfg.quantize, dataset, test_seen=metrics.get("final_fit") == "all"
        )
        atomic_write_bytes(
            paths.run_dir / f"quantize_{cfg.quantize}.json", json.dumps(report.to_dict(), indent=2).encode()
        )
    atomic_write_bytes(paths.run_dir / "config.json", cfg.to_json().encode())


def _link_latest(cfg: TrainConfig, paths: RunPaths) -> None:
    """Point ``retrain_runs/latest`` at this run, so ``label_image`` finds it without flags."""
    if cfg.output_dir:
        return
    latest = paths.run_dir.parent / "latest"
    with contextlib.suppress(OSError):
        tmp = latest.with_name(f".latest-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(paths.run_dir.name)
        os.replace(tmp, latest)


def _finetune_checkpoint(checkpoint: Path) -> Path:
    """Fine-tuning's checkpoint, beside the head's: ``checkpoint.npz`` -> ``checkpoint-finetune.pt``."""
    return checkpoint.with_name(checkpoint.stem + "-finetune.pt")


class _TrainingLogger:
    """Called at every evaluation step: the log line, TensorBoard, snapshots and checkpoints."""

    def __init__(
        self,
        cfg: TrainConfig,
        labels: list[str],
        paths: RunPaths,
        snapshot: Callable[[int, SoftmaxHead], None],
        fingerprint: dict,
        history: dict[str, list] | None = None,
    ):
        from retrain.summaries import EventWriter, new_run_dirs

        self.labels, self.checkpoint, self.snapshot = labels, paths.checkpoint, snapshot
        self.fingerprint = fingerprint
        self.history = history if history is not None else defaultdict(list)  # curves for the report
        train_dir, val_dir = new_run_dirs(paths.summaries_dir)
        self.train_writer, self.val_writer = EventWriter(train_dir), EventWriter(val_dir)
        self.last_checkpoint = time.monotonic()
        self.interval = cfg.intermediate_store_frequency
        self.histogram_every = histogram_interval(cfg.eval_step_interval, cfg.how_many_training_steps)

    def __call__(self, r: StepReport, head: SoftmaxHead) -> None:
        val = (
            f", Validation accuracy = {100 * r.validation_accuracy:.1f}% (N={r.validation_count})"
            if r.validation_accuracy is not None
            else ""
        )
        log.info(
            "Step %d: Train accuracy = %.1f%%, Cross entropy = %.6f%s",
            r.step,
            100 * r.train_accuracy,
            r.cross_entropy,
            val,
        )
        for name in (
            "step",
            "train_accuracy",
            "cross_entropy",
            "validation_accuracy",
            "validation_cross_entropy",
        ):
            self.history[name].append(getattr(r, name))
        self.train_writer.scalars({"accuracy": r.train_accuracy, "cross_entropy": r.cross_entropy}, r.step)
        if r.step % self.histogram_every == 0 or r.step == head.steps:
            head_histograms(self.train_writer, head, r.step)
        if r.validation_accuracy is not None:
            self.val_writer.scalars(
                {"accuracy": r.validation_accuracy, "cross_entropy": r.validation_cross_entropy}, r.step
            )
        if self.interval > 0 and r.step % self.interval == 0 and r.step < head.steps:
            self.snapshot(r.step, head)
        now = time.monotonic()
        if now - self.last_checkpoint > 2.0 or r.step == head.steps:
            self.save_checkpoint(head)
            self.last_checkpoint = now

    def out_of_fold(self, cross) -> None:
        """TensorBoard's validation curve when nothing is held out: the cross-fit's out-of-fold scores."""
        for step, acc, loss in zip(cross.curve_steps, cross.curve_accuracy, cross.curve_loss):
            self.val_writer.scalars({"accuracy": float(acc), "cross_entropy": float(loss)}, int(step))

    def save_checkpoint(self, head: SoftmaxHead) -> None:
        import io

        state = head.state_dict()
        buf = io.BytesIO()
        best = state["best"]
        np.savez(
            buf,
            W=state["W"],
            b=state["b"],
            step=state["step"],
            opt_keys=np.array(sorted(state["opt"])),
            **{f"opt_{k}": v for k, v in state["opt"].items()},
            best_W=best["W"],
            best_b=best["b"],
            best_step=best["step"],
            best_score=np.array(best["score"]),
            rng=json.dumps(state["rng"]),
            labels=np.array(self.labels, dtype=object).astype(str),
            settings=json.dumps(self.fingerprint, sort_keys=True),
        )
        atomic_write_bytes(self.checkpoint, buf.getvalue())

    def load_checkpoint(self) -> dict | None:
        path = self.checkpoint
        if not path.exists():
            log.warning("--resume: no checkpoint at %s; starting from step 0", path)
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if list(z["labels"]) != list(self.labels):
                    raise RetrainError(
                        f"--resume: checkpoint {path} was trained on other classes; remove it or "
                        "use another --checkpoint_path"
                    )
                saved = json.loads(str(z["settings"])) if "settings" in z.files else {}
                if saved != self.fingerprint:
                    changed = sorted(k for k in self.fingerprint if saved.get(k) != self.fingerprint[k])
                    raise RetrainError(
                        f"--resume: checkpoint {path} belongs to a run with other settings "
                        f"({', '.join(changed)} differ); run with the same flags, or remove it (or use another "
                        "--checkpoint_path) to start from step 0"
                    )
                state = {
                    "W": z["W"],
                    "b": z["b"],
                    "step": int(z["step"]),
                    "opt": {k: z[f"opt_{k}"] for k in z["opt_keys"]},
                    "best": {
                        "W": z["best_W"],
                        "b": z["best_b"],
                        "step": int(z["best_step"]),
                        "score": tuple(float(x) for x in z["best_score"]),
                    },
                    "rng": json.loads(str(z["rng"])),
                }
        except RetrainError:
            raise
        except Exception as exc:  # noqa: BLE001 - np.load raises many types for a damaged file
            raise RetrainError(
                f"--resume: checkpoint {path} is damaged or not a retrain checkpoint "
                f"({type(exc).__name__}); remove it to start from step 0"
            ) from None
        log.info("--resume: continuing from step %d of %s", state["step"], path)
        return state

    def close(self) -> None:
        self.train_writer.close()
        self.val_writer.close()
