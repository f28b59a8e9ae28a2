"""The whole run: data -> features (cache) -> new layer [-> fine-tune] -> test -> export.

``train()`` is the library entry point; the ``retrain`` command parses flags and calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.backbones import BackboneSpec, get_backbone
from retrain.cache import BottleneckStore, atomic_write_bytes
from retrain.config import TrainConfig, default_cache_dir
from retrain.data import (
    TESTING,
    TRAINING,
    VALIDATION,
    Dataset,
    assign_splits,
    discover,
    drop_records,
    printable,
)
from retrain.errors import RetrainError, SkippedFilesError
from retrain.features import FeatureTable, cache_namespace, compute_features, make_engine
from retrain.head import SoftmaxHead, StepReport

log = logging.getLogger("retrain")


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


@dataclass
class Split:
    """Features and labels of one split; ``paths`` and their content ``keys`` align with rows."""

    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    keys: list[bytes]


@dataclass
class RunPaths:
    run_dir: Path
    output_graph: Path
    output_labels: Path
    summaries_dir: Path
    checkpoint: Path
    intermediate_dir: Path
    saved_model_dir: Path | None


def train(image_dir: str | os.PathLike | None = None, config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Retrain a classifier on a folder of class sub-folders and export it.

    ``train("photos", how_many_training_steps=500)`` is the same as
    ``retrain --image_dir photos --how_many_training_steps 500``.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if image_dir is not None:
        cfg.image_dir = os.fspath(image_dir)
    return _Run(cfg).run()


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
    elif cfg.resume and not cfg.checkpoint_path and (last := _last_checkpointed_run(Path("retrain_runs"))):
        run_dir = last  # --resume alone continues the interrupted run instead of starting a new folder
    else:
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


def _last_checkpointed_run(root: Path) -> Path | None:
    """The run folder under ``root`` whose checkpoint was written last: the one an interruption left.

    (``root/latest`` moves only when a run finishes, so it cannot name an interrupted run.)
    """
    found = [(f.stat().st_mtime, f.parent) for pattern in ("*/checkpoint.npz", "*/checkpoint-finetune.pt")
             for f in root.glob(pattern) if not f.parent.is_symlink()]
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
    folders = {paths.run_dir, paths.output_graph.parent, paths.output_labels.parent, paths.summaries_dir,
               paths.checkpoint.parent}
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


class _Run:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.spec = resolve_backbone(cfg)
        self.seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
        self.timings: dict[str, float] = {}
        self.cpu_timings: dict[str, float] = {}  # CPU seconds, all threads

    # -- the stages ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t_start = self.cfg, time.perf_counter()
        dataset = self._discover()
        # After discovery, so that a bad --image_dir leaves no empty run folder behind.
        self.paths = _resolve_paths(cfg, reserve=True)
        _check_writable(self.paths, cfg)
        table, store = self._features(dataset)
        dataset = drop_records(dataset, set(table.skipped))
        dataset = assign_splits(
            dataset, validation_percentage=cfg.validation_percentage, testing_percentage=cfg.testing_percentage
        )
        for notice in dataset.notices[len(self._early_notices):]:
            log.warning("%s", notice)
        self._report_counts(dataset)
        splits = {name: self._split(dataset, table, store, name) for name in (TRAINING, VALIDATION, TESTING)}
        head = self._train_head(dataset, splits)
        backbone_onnx = None
        if cfg.fine_tune:
            from retrain.finetune import fine_tune

            head, backbone_onnx, splits = fine_tune(self, dataset, splits, head)
        test = self._test(dataset, splits[TESTING], head)
        metrics = {
            "test_accuracy": test[0],
            "test_count": test[1],
            "validation_accuracy": self.validation_accuracy,
            "best_step": getattr(head, "best_step_", None),
            "train_count": len(splits[TRAINING].y),
            "skipped_files": len(table.skipped),
            "seed": self.seed,
        }
        self._export(dataset, head, metrics, backbone_onnx)
        self.timings["total"] = time.perf_counter() - t_start
        metrics["seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        metrics["cpu_seconds"] = {k: round(v, 3) for k, v in self.cpu_timings.items()}
        atomic_write_bytes(self.paths.run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
        self._link_latest()
        return TrainResult(
            labels=dataset.labels,
            test_accuracy=test[0],
            test_count=test[1],
            validation_accuracy=self.validation_accuracy,
            output_graph=self.paths.output_graph,
            output_labels=self.paths.output_labels,
            run_dir=self.paths.run_dir,
            metrics=metrics,
            skipped=table.skipped,
            misclassified=test[2],
            config=cfg,
        )

    def _discover(self) -> Dataset:
        cfg = self.cfg
        if not cfg.image_dir:
            from retrain.sample_data import sample_image_dir

            cfg.image_dir = str(sample_image_dir())
            log.info("No --image_dir given: training on the bundled sample photos in %s", cfg.image_dir)
        dataset = discover(cfg.image_dir)
        self._early_notices = list(dataset.notices)
        for notice in dataset.notices:
            log.warning("%s", notice)
        log.info("Found %d images in %d classes under %s", len(dataset.records), len(dataset.labels),
                 printable(str(dataset.image_dir)))
        return dataset

    def _features(self, dataset: Dataset) -> tuple[FeatureTable, BottleneckStore]:
        cfg, spec = self.cfg, self.spec
        root = Path(cfg.bottleneck_dir) if cfg.bottleneck_dir else default_cache_dir() / "bottlenecks"
        try:
            store = BottleneckStore(root / cache_namespace(spec), spec.feature_dim)
        except OSError as exc:
            raise RetrainError(f"cannot use --bottleneck_dir {printable(str(root))!r}: {exc.strerror or exc}") from None
        model_dir = cfg.model_dir or None
        table = compute_features(
            [r.path for r in dataset.records],
            spec,
            store,
            engine_factory=lambda: make_engine(spec, device=cfg.device, model_dir=model_dir),
            batch_size=cfg.batch_size,
            workers=cfg.num_workers or None,
            progress=not cfg.quiet,
        )
        self.timings["features"] = table.seconds
        self.cpu_timings["features"] = table.cpu_seconds
        rate = table.computed / table.seconds if table.seconds and table.computed else 0.0
        where = printable(str(store.directory))
        if table.computed:
            log.info("Bottlenecks: %d computed in %.1f s (%.1f images/s), %d reused from the cache in %s",
                     table.computed, table.seconds, rate, table.cached, where)
        else:
            log.info("Bottlenecks: all %d reused from the cache in %s", table.cached, where)
        self._report_skipped(table)
        self._report_duplicates(dataset, table)
        store.compact()
        return table, store

    def _report_skipped(self, table: FeatureTable) -> None:
        for path, reason in sorted(table.skipped.items()):
            log.warning("Skipped %s: %s", printable(path), reason)
        if table.skipped:
            log.warning("Skipped %d file(s) that could not be used (listed above).", len(table.skipped))
            if self.cfg.strict:
                raise SkippedFilesError(
                    f"--strict: {len(table.skipped)} file(s) could not be used (listed above); "
                    "fix or remove them, or run without --strict to skip them."
                )

    def _report_duplicates(self, dataset: Dataset, table: FeatureTable) -> None:
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
                log.warning("The same image is in %d classes: %s", len(classes), names)

    def _report_counts(self, dataset: Dataset) -> None:
        counts = dataset.counts()
        width = max(len(printable(label)) for label in dataset.labels)
        log.info("%-*s  %8s %10s %7s", width, "class", "training", "validation", "testing")
        for label, c in counts.items():
            log.info("%-*s  %8d %10d %7d", width, printable(label), c[TRAINING], c[VALIDATION], c[TESTING])

    def _split(self, dataset: Dataset, table: FeatureTable, store: BottleneckStore, name: str) -> Split:
        records = dataset.split(name)
        keys = [table.keys[r.path] for r in records]
        X = store.get_many(keys) if records else np.zeros((0, self.spec.feature_dim), np.float32)
        return Split(X, np.array([r.label_index for r in records], dtype=np.int64), [r.path for r in records], keys)

    def _train_head(self, dataset: Dataset, splits: dict[str, Split]) -> SoftmaxHead:
        cfg = self.cfg
        train, val = splits[TRAINING], splits[VALIDATION]
        X_train, y_train = train.X, train.y
        if cfg.flip_left_right or cfg.random_crop or cfg.random_scale or cfg.random_brightness:
            from retrain.distort import distorted_training_features

            X_train, y_train = distorted_training_features(self, train)
        head = SoftmaxHead(
            steps=cfg.how_many_training_steps,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.train_batch_size,
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
            class_balance=cfg.class_balance,
            seed=self.seed,
        )
        logger = _TrainingLogger(self, dataset, head)
        resume_state = logger.load_checkpoint() if cfg.resume else None
        t0 = time.perf_counter()
        try:
            head.fit(
                X_train, y_train,
                n_classes=len(dataset.labels),
                X_val=val.X, y_val=val.y,
                eval_every=max(1, cfg.eval_step_interval),
                validation_batch_size=cfg.validation_batch_size,
                on_eval=logger,
                resume_state=resume_state,
            )
        finally:
            logger.close()
        self.timings["train_head"] = time.perf_counter() - t0
        if len(val.y):
            self.validation_accuracy = float((head.predict(val.X) == val.y).mean())
            log.info("Kept the weights of step %d (best validation accuracy %.1f%%, N=%d)",
                     head.best_step_, 100 * self.validation_accuracy, len(val.y))
        else:
            self.validation_accuracy = None
        return head

    def _test(self, dataset: Dataset, test: Split, head) -> tuple[float | None, int, list[tuple[str, str]]]:
        cfg = self.cfg
        if not len(test.y):
            log.warning("No test images (every class is too small or --testing_percentage is 0): test accuracy "
                        "is not measured.")
            return None, 0, []
        idx = np.arange(len(test.y))
        if 0 < cfg.test_batch_size < len(idx):
            idx = np.random.default_rng(self.seed + 2).choice(idx, size=cfg.test_batch_size, replace=False)
        pred = head.predict(test.X[idx])
        acc = float((pred == test.y[idx]).mean())
        log.info("Final test accuracy = %.1f%% (N=%d)", 100 * acc, len(idx))
        wrong = [(test.paths[i], dataset.labels[p]) for i, p in zip(idx, pred) if p != test.y[i]]
        if cfg.print_misclassified_test_images:
            log.info("=== MISCLASSIFIED TEST IMAGES ===")
            for path, label in wrong:
                log.info("%70s  %s", printable(path), printable(label))
        return acc, len(idx), wrong

    # -- outputs ------------------------------------------------------------------------------
    def classifier_model(self, dataset: Dataset, head, metrics: dict, backbone_onnx=None):
        from retrain.export import backbone_onnx_path, build_classifier, make_manifest

        manifest = make_manifest(
            self.spec, dataset.labels, output_name=self.cfg.final_tensor_name,
            fine_tuned=backbone_onnx is not None, metrics=metrics,
        )
        source = backbone_onnx if backbone_onnx is not None else backbone_onnx_path(self.spec, self.cfg.model_dir or None)
        return build_classifier(source, head.coef_, head.intercept_, manifest), manifest

    def _export(self, dataset: Dataset, head, metrics: dict, backbone_onnx) -> None:
        from retrain.export import save_model, write_labels, write_saved_model_dir

        t0 = time.perf_counter()
        paths = self.paths
        model, manifest = self.classifier_model(dataset, head, metrics, backbone_onnx)
        save_model(model, paths.output_graph)
        write_labels(dataset.labels, paths.output_labels)
        log.info("Wrote the model to %s and its labels to %s", paths.output_graph, paths.output_labels)
        if paths.saved_model_dir is not None:
            write_saved_model_dir(paths.saved_model_dir, model, manifest)
            log.info("Wrote the serving folder %s", paths.saved_model_dir)
        if self.cfg.quantize:
            from retrain.quantize import quantize_after_training

            quantize_after_training(self, dataset, model, manifest)
        atomic_write_bytes(paths.run_dir / "config.json", self.cfg.to_json().encode())
        self.timings["export"] = time.perf_counter() - t0

    def _link_latest(self) -> None:
        """Point ``retrain_runs/latest`` at this run, so ``label_image`` finds it without flags."""
        if self.cfg.output_dir:
            return
        latest = self.paths.run_dir.parent / "latest"
        with contextlib.suppress(OSError):
            tmp = latest.with_name(f".latest-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.paths.run_dir.name)
            os.replace(tmp, latest)


class _TrainingLogger:
    """Called at every evaluation step: the log line, TensorBoard, snapshots and checkpoints."""

    def __init__(self, run: _Run, dataset: Dataset, head: SoftmaxHead):
        from retrain.summaries import EventWriter, new_run_dirs

        self.run, self.dataset, self.head = run, dataset, head
        train_dir, val_dir = new_run_dirs(run.paths.summaries_dir)
        self.train_writer, self.val_writer = EventWriter(train_dir), EventWriter(val_dir)
        self.last_checkpoint = time.monotonic()
        self.interval = run.cfg.intermediate_store_frequency
        # About 100 histogram snapshots per run: TensorBoard shows no more, and each costs a few ms.
        every = max(1, run.cfg.eval_step_interval)
        self.histogram_every = every * max(1, run.cfg.how_many_training_steps // (100 * every))

    def __call__(self, r: StepReport, head: SoftmaxHead) -> None:
        val = (
            f", Validation accuracy = {100 * r.validation_accuracy:.1f}% (N={r.validation_count})"
            if r.validation_accuracy is not None
            else ""
        )
        log.info("Step %d: Train accuracy = %.1f%%, Cross entropy = %.6f%s",
                 r.step, 100 * r.train_accuracy, r.cross_entropy, val)
        self.train_writer.scalars({"accuracy": r.train_accuracy, "cross_entropy": r.cross_entropy}, r.step)
        if r.step % self.histogram_every == 0 or r.step == head.steps:
            self.train_writer.histogram("final_retrain_ops/weights", head.coef_, r.step)
            self.train_writer.histogram("final_retrain_ops/biases", head.intercept_, r.step)
        if r.validation_accuracy is not None:
            self.val_writer.scalars({"accuracy": r.validation_accuracy,
                                     "cross_entropy": r.validation_cross_entropy}, r.step)
        if self.interval > 0 and r.step % self.interval == 0 and r.step < head.steps:
            self._intermediate(r.step, head)
        now = time.monotonic()
        if now - self.last_checkpoint > 2.0 or r.step == head.steps:
            self.save_checkpoint(head)
            self.last_checkpoint = now

    def _intermediate(self, step: int, head: SoftmaxHead) -> None:
        from retrain.export import save_model

        model, _ = self.run.classifier_model(self.dataset, head, {"step": step})
        path = self.run.paths.intermediate_dir / f"intermediate_{step}.onnx"
        save_model(model, path)
        log.info("Saved intermediate model %s", path)

    def save_checkpoint(self, head: SoftmaxHead) -> None:
        import io

        state = head.state_dict()
        buf = io.BytesIO()
        best = state["best"]
        np.savez(
            buf, W=state["W"], b=state["b"], step=state["step"],
            opt_keys=np.array(sorted(state["opt"])), **{f"opt_{k}": v for k, v in state["opt"].items()},
            best_W=best["W"], best_b=best["b"], best_step=best["step"], best_score=np.array(best["score"]),
            rng=json.dumps(state["rng"]), labels=np.array(self.dataset.labels, dtype=object).astype(str),
        )
        atomic_write_bytes(self.run.paths.checkpoint, buf.getvalue())

    def load_checkpoint(self) -> dict | None:
        path = self.run.paths.checkpoint
        if not path.exists():
            log.warning("--resume: no checkpoint at %s; starting from step 0", path)
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if list(z["labels"]) != list(self.dataset.labels):
                    raise RetrainError(f"--resume: checkpoint {path} was trained on other classes; remove it or "
                                       "use another --checkpoint_path")
                state = {
                    "W": z["W"], "b": z["b"], "step": int(z["step"]),
                    "opt": {k: z[f"opt_{k}"] for k in z["opt_keys"]},
                    "best": {"W": z["best_W"], "b": z["best_b"], "step": int(z["best_step"]),
                             "score": tuple(float(x) for x in z["best_score"])},
                    "rng": json.loads(str(z["rng"])),
                }
        except RetrainError:
            raise
        except Exception as exc:  # noqa: BLE001 - np.load raises many types for a damaged file
            raise RetrainError(f"--resume: checkpoint {path} is damaged or not a retrain checkpoint "
                               f"({type(exc).__name__}); remove it to start from step 0") from None
        log.info("--resume: continuing from step %d of %s", state["step"], path)
        return state

    def close(self) -> None:
        self.train_writer.close()
        self.val_writer.close()
