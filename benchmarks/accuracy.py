"""Issue 13's accuracy bar: retrain's default run vs a tuned logistic regression, on real photo sets.

    python benchmarks/accuracy.py SET [SET ...] [--seeds 0 1 2] [--test_fraction 0.2] [--max_per_class N]
                                  [--modes train+val all train] [--json FILE]

For every photo set (a folder of class folders) and every split seed, the images are split into a
training folder and a disjoint test set (``--test_fraction`` of each class, drawn by a hash of the seed and
the image's group: identical files and ``_nohash_`` near-duplicates always land on the same side). Then:

* ``retrain`` (the library call behind the command, ``retrain.train``) runs on the training folder with
  default flags and ``--seed`` = the split seed, once per ``--final_fit`` mode in ``--modes``
  (``train+val`` is the default run; ``train`` is retrain.py's way; ``all`` folds its own test split in);
* the probe: scikit-learn's ``LogisticRegressionCV`` (C from a grid of 11 values, 1e-3 to 1e2, by 5-fold
  cross-validation) on the same backbone's features of **100%** of the training folder;
* each is scored on the disjoint test set. retrain's exported layer is read from the ONNX file it wrote
  and applied to the test images' cached features; for the first seed of each set the whole exported
  model is also run on the test images' pixels, to check that the two agree.

Prints one Markdown table: mean and spread (min-max) over the seeds, per set and method.
Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _images(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    from retrain.data import discover

    ds = discover(folder)
    return ds.labels, [Path(r.path) for r in ds.records], [r.label_index for r in ds.records]


def _features(paths: list[Path], store_root: Path):
    from retrain import extract_features

    table = extract_features([str(p) for p in paths], bottleneck_dir=store_root)
    ok = [i for i, p in enumerate(paths) if str(p) in table.keys]
    keys = [table.keys[str(paths[i])] for i in ok]
    return ok, table.matrix([str(paths[i]) for i in ok]), keys


def _outer_split(
    paths: list[Path], keys: list[bytes], y: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """True for test rows: per class, the groups with the lowest hash of (seed, group) until ``fraction``."""
    from retrain.fit import labelled_groups

    groups = np.array(labelled_groups(keys, [str(p) for p in paths]))
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.unique(groups[y == c])
        order = sorted(
            members, key=lambda g: hashlib.sha1(f"{seed}/{g}/{keys[g].hex()}".encode()).hexdigest()
        )
        need, taken = round(fraction * np.count_nonzero(y == c)), 0
        for g in order:
            if taken >= need:
                break
            rows = (groups == g) & (y == c)
            test |= groups == g
            taken += int(rows.sum())
    return test


def _outer_folds(paths: list[Path], keys: list[bytes], y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold ids (N,) in 0..k-1: per class, groups in order of a hash of (seed, group) dealt round-robin.

    A group's rows (copies, ``_nohash_`` names) share a fold, so no test image has a copy in training.
    """
    from retrain.fit import labelled_groups

    groups = np.array(labelled_groups(keys, [str(p) for p in paths]))
    fold = np.full(len(y), -1)
    for c in np.unique(y):
        members = [g for g in np.unique(groups[y == c]) if fold[groups == g][0] < 0]
        order = sorted(
            members, key=lambda g: hashlib.sha1(f"{seed}/{g}/{keys[g].hex()}".encode()).hexdigest()
        )
        for i, g in enumerate(order):
            fold[groups == g] = i % k
    return fold


def _link_training_folder(dst: Path, paths: list[Path], labels: list[str], y: np.ndarray) -> None:
    for i, (p, c) in enumerate(zip(paths, y)):
        target = dst / labels[c] / f"{i:06d}_{p.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), target)


def _exported_layer(graph: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import onnx
    from onnx import numpy_helper

    from retrain.export import get_manifest

    model = onnx.load(str(graph))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return init["final_retrain_ops/weights"], init["final_retrain_ops/biases"], get_manifest(model)["labels"]


def _probe(X: np.ndarray, y: np.ndarray) -> tuple[object, float]:
    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegressionCV(Cs=list(np.logspace(-3, 2, 11)), cv=5, max_iter=3000).fit(X, y)
    return lr, float(np.ravel(lr.C_)[0])


def run_set(folder: Path, args, work: Path) -> dict:
    bottlenecks = args.bottleneck_dir or work / "bottlenecks"

    labels, paths, y_all = _images(folder)
    y_all = np.array(y_all)
    if args.max_per_class:
        rng = np.random.default_rng(12345)
        keep = np.sort(
            np.concatenate(
                [rng.permutation(np.flatnonzero(y_all == c))[: args.max_per_class] for c in np.unique(y_all)]
            )
        )
        paths, y_all = [paths[i] for i in keep], y_all[keep]
    t0 = time.perf_counter()
    ok, X, keys = _features(paths, bottlenecks)
    paths, y = [paths[i] for i in ok], y_all[ok]
    print(
        f"{folder}: {len(y)} images, {len(labels)} classes; features in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    out = {"set": str(folder), "images": len(y), "classes": len(labels), "runs": []}
    for seed in args.seeds:
        if args.outer_folds:
            fold = _outer_folds(paths, keys, y, args.outer_folds, seed)
            tests = [fold == f for f in range(args.outer_folds)]
        else:
            tests = [_outer_split(paths, keys, y, args.test_fraction, seed)]
        row = {"seed": seed, "train": 0, "test": 0}
        hits: dict[str, list[np.ndarray]] = {}
        for f, test in enumerate(tests):
            part = _one_split(folder, labels, paths, X, y, test, seed, f, args, work, bottlenecks)
            row["train"] += part.pop("train")
            row["test"] += int(test.sum())
            for key, value in part.items():
                if isinstance(value, np.ndarray):
                    hits.setdefault(key, []).append(value)
                elif isinstance(value, (int, float)) and key.endswith("seconds"):
                    row[key] = row.get(key, 0.0) + value
                else:
                    row.setdefault(key, value)
        for key, parts in hits.items():
            correct = np.concatenate(parts)
            row[key] = float(correct.mean())
            row[f"{key}_hits"] = correct.astype(int).tolist()
        print(
            json.dumps({k: v for k, v in row.items() if not k.endswith("_hits")}), file=sys.stderr, flush=True
        )
        out["runs"].append(row)
    return out


def _setting(text: str) -> tuple[str, object]:
    """``name=value`` from a ``--modes`` entry, the value as an int or float where it reads as one."""
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def _one_split(folder, labels, paths, X, y, test, seed, f, args, work, bottlenecks) -> dict:
    """retrain in each mode and the probe on the rows not in ``test``; per method a bool array of test hits."""
    import retrain

    tr = np.flatnonzero(~test)
    train_dir = work / f"split-{folder.name}-{seed}-{f}"
    _link_training_folder(train_dir, [paths[i] for i in tr], labels, y[tr])
    Xt, yt = X[test], y[test]
    row: dict = {"train": len(tr)}
    for mode in args.modes:
        t1 = time.perf_counter()
        final_fit, *extra = mode.split(",")
        result = retrain.train(
            train_dir,
            bottleneck_dir=str(bottlenecks),
            output_dir=str(work / "run"),
            seed=seed,
            final_fit=final_fit,
            quiet=True,
            **dict(_setting(text) for text in extra),
        )
        W, b, run_labels = _exported_layer(result.output_graph)
        to_set = np.array([labels.index(label) for label in run_labels])
        pred = to_set[(Xt @ W + b).argmax(axis=1)]
        row[mode] = pred == yt
        row[f"{mode}_seconds"] = time.perf_counter() - t1
        row[f"{mode}_internal_test"] = result.test_accuracy
        row[f"{mode}_steps"] = result.metrics.get("best_step")
        if seed == args.seeds[0] and f == 0 and mode == args.modes[0]:
            row["onnx_agreement"] = _agreement(
                result.output_graph, [paths[i] for i in np.flatnonzero(test)], run_labels, pred, to_set
            )
    t1 = time.perf_counter()
    lr, c = _probe(X[tr], y[tr])
    row["probe"] = lr.predict(Xt) == yt
    row["probe_C"] = c
    row["probe_seconds"] = time.perf_counter() - t1
    return row


def _agreement(graph: Path, test_paths: list[Path], run_labels, pred_from_features, to_set, limit: int = 64):
    """Share of test images on which the whole exported model (pixels in) agrees with the layer on features."""
    import retrain

    clf = retrain.load(graph)
    n = min(limit, len(test_paths))
    got = [to_set[run_labels.index(r[0].label)] for r in clf.classify([str(p) for p in test_paths[:n]])]
    return float(np.mean(np.array(got) == pred_from_features[:n]))


def _cell(values: list[float]) -> str:
    v = 100 * np.array(values)
    return f"{v.mean():.1f}% ({v.min():.1f}-{v.max():.1f})" if len(v) > 1 else f"{v.mean():.1f}%"


def table(results: list[dict], modes: list[str]) -> str:
    names = {
        "train+val": "retrain default (train+val)",
        "all": "--final_fit all",
        "train": "--final_fit train",
    }
    head = [
        "set",
        "images",
        "classes",
        *[names.get(m, m) for m in modes],
        "LogisticRegressionCV, 100%",
        *[f"{m} - probe, points (images better/worse)" for m in modes],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        runs = r["runs"]
        cells = [
            Path(r["set"]).name,
            str(r["images"]),
            str(r["classes"]),
            *[_cell([x[m] for x in runs]) for m in modes],
            _cell([x["probe"] for x in runs]),
            *[_difference(runs, m) for m in modes],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference(runs: list[dict], mode: str) -> str:
    """Mean (min to max) over seeds of mode - probe, and the test images only one of the two got right."""
    diff = [100 * (x[mode] - x["probe"]) for x in runs]
    ours = np.concatenate([x[f"{mode}_hits"] for x in runs])
    probe = np.concatenate([x["probe_hits"] for x in runs])
    better, worse = int(np.sum(ours > probe)), int(np.sum(ours < probe))
    return f"{np.mean(diff):+.1f} ({min(diff):+.1f} to {max(diff):+.1f}; {better}/{worse})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path, help="photo set folders (one sub-folder per class)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test_fraction", type=float, default=0.2)
    ap.add_argument(
        "--outer_folds",
        type=int,
        default=0,
        help="K > 1: every image is tested once, in K outer folds per seed (instead of one --test_fraction split)",
    )
    ap.add_argument("--max_per_class", type=int, default=0, help="use at most N images per class (0 = all)")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["train+val", "all", "train"],
        help="--final_fit values to run, each optionally with settings: e.g. train+val,class_balance=none",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--bottleneck_dir", type=Path, help="feature cache to reuse (default: a temporary folder)"
    )
    args = ap.parse_args()
    logging.getLogger("retrain").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_set(s, args, Path(tmp)) for s in args.sets]
    where = (
        f"every image once, in {args.outer_folds} outer folds per seed"
        if args.outer_folds
        else f"a disjoint {100 * args.test_fraction:.0f}% of each set"
    )
    print(f"Test accuracy on {where}; mean (min-max) over split seeds {', '.join(map(str, args.seeds))}")
    print(table(results, args.modes))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
