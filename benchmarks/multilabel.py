"""Issue 14's bars: ``retrain --multi_label`` vs a tuned one-vs-rest logistic regression, and its speed.

    python benchmarks/multilabel.py [--data /work/data/multilabel] [--seeds 0 1 2] [--test_fraction 0.3]
                                    [--bottleneck_dir DIR] [--timing_rows 10000] [--json FILE]

Accuracy, on a photo set with known multiple labels (``images/`` + ``labels.csv``: columns
``file,labels`` with labels separated by ``;``; the default is the composites of docs/datasets.md):

* the features are the run's own (``retrain.extract_features`` through the cache), one row per distinct
  photo (identical files are one row, as in a run);
* per seed, ``--test_fraction`` of the photos (by a hash of the seed and the photo's group) are held out;
* retrain: the library stage behind ``retrain --labels_file``
  (:func:`retrain.multilabel.fit_multi_label`, default flags, ``--seed`` = the seed) on the rest, scored on
  the held-out photos at its tuned per-label thresholds and at a fixed 0.5;
* the probe: scikit-learn's ``LogisticRegressionCV`` per label (C from 11 values, 1e-3 to 1e2, by 5-fold
  cross-validation, scored by average precision) on the same features, at 0.5 and at thresholds tuned
  the same way on its own 5-fold out-of-fold probabilities.

Timing (``--timing_rows``): the head stage of a warm run (everything after the cached features: the
cross-fit, the final layer, thresholds) on the same synthetic feature rows of that many images, multi-label
(``fit_multi_label``) vs single-label on each row's primary label (``plan_final_fit(weight_decays=[0.0])`` +
``SoftmaxHead``), both at the default 4,000 steps, in CPU seconds (``time.process_time``) and wall seconds; once
with one label per image and once with about 2.8.

Prints Markdown tables: mean and spread (min-max) over the seeds. Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def load_rows(data: Path, bottleneck_dir: str):
    from retrain import extract_features
    from retrain.backbones import get_backbone
    from retrain.config import TrainConfig
    from retrain.multilabel import build_rows, dataset_from_labels_file

    cfg = TrainConfig(image_dir=str(data / "images"), labels_file=str(data / "labels.csv"), multi_label=True)
    dataset, file_labels = dataset_from_labels_file(cfg)
    table = extract_features(
        dataset, architecture=get_backbone(cfg.architecture), bottleneck_dir=bottleneck_dir
    )
    return cfg, build_rows(dataset, table, file_labels)


def split_for_seed(rows, fraction: float, seed: int) -> np.ndarray:
    """The split column for one seed: a group is held out when the hash of (seed, group) is below ``fraction``."""
    from retrain.data import TESTING, TRAINING

    def h(g: int) -> float:
        return int(hashlib.sha1(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 2**32

    return np.array([TESTING if h(int(g)) < fraction else TRAINING for g in rows.group], dtype="<U10")


def probe(X, Y, X_test, seed: int):
    """One-vs-rest LogisticRegressionCV: test probabilities, thresholds tuned on its own out-of-fold ones."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import KFold, cross_val_predict

    from retrain.mlhead import tune_thresholds

    test_probs, oof, Cs = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(Y.shape[1]):
            lr = LogisticRegressionCV(
                Cs=list(np.logspace(-3, 2, 11)), cv=5, scoring="average_precision", max_iter=3000
            ).fit(X, Y[:, j])
            Cs.append(float(np.ravel(lr.C_)[0]))
            test_probs.append(lr.predict_proba(X_test)[:, 1])
            folds = KFold(5, shuffle=True, random_state=seed)
            oof.append(
                cross_val_predict(
                    LogisticRegression(C=Cs[-1], max_iter=3000), X, Y[:, j], cv=folds, method="predict_proba"
                )[:, 1]
            )
    thresholds, _ = tune_thresholds(np.stack(oof, 1), Y)
    return np.stack(test_probs, 1), thresholds, Cs


def accuracy(args) -> list[dict]:
    from retrain.backbones import get_backbone
    from retrain.data import TESTING, TRAINING
    from retrain.mlhead import example_f1, mean_average_precision
    from retrain.multilabel import fit_multi_label

    cfg, rows = load_rows(Path(args.data), args.bottleneck_dir)
    spec = get_backbone(cfg.architecture)
    print(
        f"{len(rows.paths)} distinct photos, {len(rows.labels)} labels: {', '.join(rows.labels)}",
        file=sys.stderr,
    )
    out = []
    for seed in args.seeds:
        rows.split = split_for_seed(rows, args.test_fraction, seed)
        tr, te = rows.where(TRAINING), rows.where(TESTING)
        t0 = time.perf_counter()
        cfg.seed = seed
        fit = fit_multi_label(cfg, spec, rows, seed)
        seconds = time.perf_counter() - t0
        p = fit.head.predict_proba(rows.X[te])
        truth = rows.Y[te]
        t0 = time.perf_counter()
        pp, pthr, Cs = probe(rows.X[tr], rows.Y[tr], rows.X[te], seed)
        probe_seconds = time.perf_counter() - t0
        result = {
            "seed": seed,
            "train": int(len(tr)),
            "test": int(len(te)),
            "retrain": {
                "mAP": mean_average_precision(p, truth),
                "example_f1_tuned": example_f1(p >= fit.thresholds, truth),
                "example_f1_0.5": example_f1(p >= 0.5, truth),
                "exact_match_tuned": float(((p >= fit.thresholds) == truth).all(1).mean()),
                "steps": int(fit.head.steps),
                "seconds": seconds,
            },
            "ovr_logreg": {
                "mAP": mean_average_precision(pp, truth),
                "example_f1_tuned": example_f1(pp >= pthr, truth),
                "example_f1_0.5": example_f1(pp >= 0.5, truth),
                "exact_match_tuned": float(((pp >= pthr) == truth).all(1).mean()),
                "C": Cs,
                "seconds": probe_seconds,
            },
        }
        print(json.dumps(result), file=sys.stderr)
        out.append(result)
    return out


def synthetic_rows(n: int, seed: int, *, extra: float, signal: float = 0.04):
    """``n`` synthetic feature rows (1,280 features, 10 labels) shared by both timings: every row has one
    primary label (the single-label run's class) and, with probability ``extra`` each, other labels; the
    features are noise plus ``signal`` x each of its labels' centre (0.04: a weak signal, so that the fits
    run long, as on photos). Returns (X, Y (n, 10) bool, y (n,) primary label, split)."""
    from retrain.data import TESTING, TRAINING, VALIDATION

    rng = np.random.default_rng(seed)
    L, D = 10, 1280
    centers = rng.normal(0, 1, (L, D)).astype(np.float32)
    y = rng.integers(0, L, n)
    Y = rng.random((n, L)) < extra
    Y[np.arange(n), y] = True
    X = (rng.normal(0, 1, (n, D)) + Y @ centers * signal).astype(np.float32)
    split = rng.choice([TRAINING, VALIDATION, TESTING], size=n, p=[0.8, 0.1, 0.1]).astype("<U10")
    return X, Y, y, split


def timing(
    n: int, seed: int = 0, *, extra: float = 0.0, signal: float = 0.04, equal_work: bool = False
) -> dict:
    """CPU seconds (``time.process_time``, this process and its threads) and wall seconds of the head stage of a
    warm run on the same ``n`` synthetic rows (:func:`synthetic_rows`): multi-label (``fit_multi_label``:
    cross-fit, final layer, thresholds) vs single-label on the rows' primary labels (``plan_final_fit`` with
    ``weight_decays=[0.0]``, then the final ``SoftmaxHead``), both at the default 4,000 steps. ``equal_work``:
    also the two cross-fits alone for all 4,000 steps (no early stop), CPU seconds: the cost of a step."""
    import dataclasses

    from retrain.backbones import get_backbone
    from retrain.config import TrainConfig
    from retrain.data import TESTING
    from retrain.fit import plan_final_fit
    from retrain.head import SoftmaxHead
    from retrain.multilabel import Rows, fit_multi_label
    from retrain.train import head_params

    X, Y, y, split = synthetic_rows(n, seed, extra=extra, signal=signal)
    L = Y.shape[1]
    rows = Rows(
        [f"l{j}" for j in range(L)], [f"{i}.jpg" for i in range(n)], [b""] * n, X, Y, split, np.arange(n), 0
    )
    spec = get_backbone("efficientnet_lite0")
    tv = np.flatnonzero(split != TESTING)
    cfg = TrainConfig(multi_label=True, seed=seed)
    params = {**head_params(cfg), "weight_decay": 0.0}
    c0, t0 = time.process_time(), time.perf_counter()
    plan = plan_final_fit(
        X[tv], y[tv], list(range(len(tv))), n_classes=L, head_params=params, seed=seed, weight_decays=[0.0]
    )
    SoftmaxHead(**{**params, "steps": plan.steps}, seed=seed).fit(X[tv], y[tv], n_classes=L)
    single_cpu, single_wall = time.process_time() - c0, time.perf_counter() - t0
    c0, t0 = time.process_time(), time.perf_counter()
    fit = fit_multi_label(dataclasses.replace(cfg), spec, rows, seed)
    multi_cpu, multi_wall = time.process_time() - c0, time.perf_counter() - t0
    out = {
        "rows": n,
        "labels": L,
        "labels_per_image": float(Y.sum(axis=1).mean()),
        "single_label_cpu_seconds": single_cpu,
        "single_label_wall_seconds": single_wall,
        "single_label_steps": int(plan.steps),
        "multi_label_cpu_seconds": multi_cpu,
        "multi_label_wall_seconds": multi_wall,
        "multi_label_steps": int(fit.head.steps),
        "cpu_ratio": multi_cpu / single_cpu,
        "wall_ratio": multi_wall / single_wall,
    }
    if equal_work:  # the two cross-fits alone, all 4,000 steps of 5 folds each, no early stop
        from retrain.crossfit import cross_fit
        from retrain.multilabel import head_params as ml_head_params
        from retrain.multilabel import ml_cross_fit

        c0 = time.process_time()
        cross_fit(X[tv], y[tv], n_classes=L, head_params=params, seed=seed, patience=10**6)
        out["equal_work_single_cpu_seconds"] = time.process_time() - c0
        c0 = time.process_time()
        ml_cross_fit(X[tv], Y[tv], np.arange(len(tv)), params=ml_head_params(cfg), seed=seed, patience=10**6)
        out["equal_work_multi_cpu_seconds"] = time.process_time() - c0
    return out


def _mean_spread(values) -> str:
    v = np.array(values, float)
    return f"{100 * v.mean():.1f} ({100 * v.min():.1f}-{100 * v.max():.1f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/data/multilabel")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test_fraction", type=float, default=0.3)
    p.add_argument("--bottleneck_dir", default="", help="feature cache (default: retrain's)")
    p.add_argument("--timing_rows", type=int, default=10000, help="0: skip the timing")
    p.add_argument("--skip_accuracy", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report: dict = {}
    if not args.skip_accuracy:
        runs = accuracy(args)
        report["accuracy"] = runs
        print(f"\n{len(args.seeds)} seeds, test fraction {args.test_fraction}: mean (min-max), percent\n")
        print("| method | mAP | example F1, tuned thresholds | example F1, 0.5 | exact match, tuned |")
        print("|---|---|---|---|---|")
        for name, key in (
            ("retrain --multi_label", "retrain"),
            ("one-vs-rest LogisticRegressionCV", "ovr_logreg"),
        ):
            cells = [
                _mean_spread([r[key][m] for r in runs])
                for m in ("mAP", "example_f1_tuned", "example_f1_0.5", "exact_match_tuned")
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for name, key in (("retrain", "retrain"), ("probe", "ovr_logreg")):
            gain = np.array([r[key]["example_f1_tuned"] - r[key]["example_f1_0.5"] for r in runs])
            print(
                f"\n{name}: example F1 at tuned thresholds minus at 0.5: {100 * gain.mean():+.1f} points "
                f"({100 * gain.min():+.1f} to {100 * gain.max():+.1f}), better on {(gain > 0).sum()} of {len(gain)} seeds"
            )
        d = np.array([r["retrain"]["mAP"] - r["ovr_logreg"]["mAP"] for r in runs])
        print(
            f"mAP, retrain minus probe: {100 * d.mean():+.2f} points ({100 * d.min():+.2f} to {100 * d.max():+.2f}), "
            f"at least as good on {(d >= 0).sum()} of {len(d)} seeds"
        )
    if args.timing_rows:
        report["timing"] = []
        print(
            f"\nHead stage of a warm run on the same {args.timing_rows} synthetic rows x 10 labels (CPU s, wall s):\n"
        )
        print("| labels per image | single-label | multi-label | ratio, CPU (wall) |")
        print("|---|---|---|---|")
        for extra in (0.0, 0.2):
            t = timing(args.timing_rows, extra=extra, equal_work=extra == 0.0)
            report["timing"].append(t)
            print(
                f"| {t['labels_per_image']:.1f} | {t['single_label_cpu_seconds']:.1f} s, {t['single_label_wall_seconds']:.1f} s "
                f"({t['single_label_steps']} steps) | {t['multi_label_cpu_seconds']:.1f} s, {t['multi_label_wall_seconds']:.1f} s "
                f"({t['multi_label_steps']} steps) | {t['cpu_ratio']:.2f} ({t['wall_ratio']:.2f}) |",
                flush=True,
            )
        t = report["timing"][0]
        print(
            f"\nThe two cross-fits alone, 5 folds x 4,000 steps each, no early stop (equal work): single-label "
            f"{t['equal_work_single_cpu_seconds']:.1f} CPU s, multi-label {t['equal_work_multi_cpu_seconds']:.1f} CPU s, "
            f"ratio {t['equal_work_multi_cpu_seconds'] / t['equal_work_single_cpu_seconds']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
