"""Issue 12's bars on real photo sets: calibration (ECE) and the unknown score vs max-softmax and others.

    PYTHONPATH=src python benchmarks/openworld.py [--data /work/data] [--sets cutouts,deepsky,...] [--seeds 0]

For each set of /work/data (README.md there names a held-out class per set), trains retrain with default
flags on the other classes (features from --bottleneck_dir, default /work/data/.cache), then runs the
exported ONNX model on the known test split, on every image of the held-out class and on /work/data/unrelated.
Reports, from the model's own outputs: AUROC of ``unknown_score`` and of max-softmax (1 - top probability)
for known test vs held-out and vs unrelated; the share of known test images called unknown at the stored
threshold; test ECE before/after the temperature; test top-1 of the exported (calibrated) model vs the run's.
Energy (-logsumexp of the exported logits) and nearest-neighbour cosine distance to the training features
(k = 1 and 10; not in the model: it would carry every training vector) are computed beside them from the
cached features. Then: fitting cost on 10,000 synthetic cached images and the inference cost of the extra
output. The machine may be shared: timing ratios are measured inside one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SETS = {
    "cutouts": "vegetable",
    "deepsky": "planetary_nebula",
    "digits": "digit_9",
    "gcompris": "renewable_energy",
    "textures": "carpet",
}


def image_files(folder: Path) -> list[Path]:
    from retrain.images import is_image_file_name

    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file_name(p.name))


def known_folder(src: Path, held_out: str, dst: Path) -> Path:
    """``dst`` with a symlink per image of every class but ``held_out`` (the cache is keyed on content)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir() and p.name != held_out):
        for f in image_files(cls):
            target = dst / cls.name / f.relative_to(cls)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(f)
    return dst


def features(paths: list[str], bottleneck_dir: Path) -> np.ndarray:
    import retrain

    return retrain.extract_features(paths, bottleneck_dir=bottleneck_dir).matrix(paths)


def run_model(clf, paths: list[str], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    probs, scores = [], []
    for i in range(0, len(paths), batch):
        p, s = clf.predict(np.stack([clf.to_pixels(x) for x in paths[i : i + batch]]))
        probs.append(p)
        scores.append(s)
    return np.concatenate(probs), np.concatenate(scores)


def layer_of(graph: Path) -> tuple[np.ndarray, np.ndarray]:
    """The exported (temperature-folded) weights and biases of the new layer."""
    import onnx
    from onnx import numpy_helper

    init = {t.name: t for t in onnx.load(str(graph)).graph.initializer}
    return (
        numpy_helper.to_array(init["final_retrain_ops/weights"]),
        numpy_helper.to_array(init["final_retrain_ops/biases"]),
    )


def knn_distance(train: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
    from retrain.openset import normalize

    sim = normalize(X) @ normalize(train).T  # (N, T) cosine similarities
    k = min(k, sim.shape[1])
    return 1 - np.sort(sim, axis=1)[:, -k:].mean(axis=1)


def one_set(name: str, held_out: str, data: Path, bottleneck_dir: Path, seed: int, work: Path) -> dict:
    import retrain
    from retrain.calibrate import reliability, softmax
    from retrain.data import TESTING, assign_splits, discover
    from retrain.openset import auroc

    known = known_folder(data / name, held_out, work / name)
    t0 = time.perf_counter()
    res = retrain.train(
        known,
        bottleneck_dir=str(bottleneck_dir),
        output_dir=str(work / f"{name}-run-{seed}"),
        seed=seed,
        # The exported model is measured on the known test images: they must stay out of it (the default
        # --final_fit all folds them in after the run's own test).
        final_fit="train+val",
        quiet=True,
    )
    run_seconds = time.perf_counter() - t0
    ds = assign_splits(discover(known))
    test = [r for r in ds.records if r.split == TESTING]
    fitted = [r for r in ds.records if r.split != TESTING]
    test_paths = [r.path for r in test]
    y_test = np.array([r.label_index for r in test])
    groups = {
        "known": test_paths,
        "held_out": [str(p) for p in image_files(data / name / held_out)],
        "unrelated": [str(p) for p in image_files(data / "unrelated")],
    }
    clf = retrain.load(res.output_graph)
    out = {k: run_model(clf, v) for k, v in groups.items()}
    feats = {k: features(v, bottleneck_dir) for k, v in groups.items()}
    train_feats = features([r.path for r in fitted], bottleneck_dir)
    W, b = layer_of(res.output_graph)

    def energy(X):
        z = X @ W + b
        m = z.max(axis=1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))

    from retrain.openset import fit_stats

    maha = fit_stats(train_feats, np.array([r.label_index for r in fitted]), len(res.labels))
    methods = {
        "unknown_score": {k: s for k, (_, s) in out.items()},
        "mahalanobis": {k: maha.score(X) for k, X in feats.items()},
        "max_softmax": {k: 1 - p.max(axis=1) for k, (p, _) in out.items()},
        "energy": {k: energy(X) for k, X in feats.items()},
        "knn1": {k: knn_distance(train_feats, X, 1) for k, X in feats.items()},
        "knn10": {k: knn_distance(train_feats, X, 10) for k, X in feats.items()},
    }
    aurocs = {m: {o: auroc(s["known"], s[o]) for o in ("held_out", "unrelated")} for m, s in methods.items()}
    flags = {k: s > clf.unknown_threshold for k, (_, s) in out.items()}
    cal = res.metrics["calibration"]
    unknown = res.metrics["unknown"]
    leaked = leaked_test(Path(res.output_graph).parent / "duplicates.csv")
    clean = np.array([p not in leaked for p in test_paths], bool)
    p_after = out["known"][0]
    p_before = softmax(np.log(np.maximum(p_after, 1e-30)) * cal["temperature"])  # the logits before 1/T
    ece = {
        "ece_test_floor": ece_floor(p_after),
        "ece_test_clean_before": reliability(p_before[clean], y_test[clean]).ece,
        "ece_test_clean_after": reliability(p_after[clean], y_test[clean]).ece,
        "test_clean_count": int(clean.sum()),
    }
    return {
        "set": name,
        "held_out": held_out,
        "seed": seed,
        "classes": len(res.labels),
        "train_count": res.metrics["train_count"],
        "test_count": len(test_paths),
        "auroc": aurocs,
        "threshold": clf.unknown_threshold,
        "rule": unknown["rule"],
        "known_called_unknown": float(flags["known"].mean()),
        "held_out_called_unknown": float(flags["held_out"].mean()),
        "unrelated_called_unknown": float(flags["unrelated"].mean()),
        "ece_test_before": cal["ece_before"].get("test"),
        "ece_test_after": cal["ece_after"].get("test"),
        "ece_oof_before": cal["ece_before"].get("out_of_fold"),
        "ece_oof_after": cal["ece_after"].get("out_of_fold"),
        **ece,
        "temperature": cal["temperature"],
        "test_accuracy_run": res.test_accuracy,
        "test_accuracy_model": float((out["known"][0].argmax(axis=1) == y_test).mean()),
        "loco_auroc_mean": unknown["leave_one_class_out_auroc_mean"],
        "open_world_seconds": res.metrics["open_world_seconds"],
        "run_seconds": round(run_seconds, 1),
    }


def outer_folder(src: Path, held_out: str, dst: Path, leave: set[str]) -> Path:
    """``dst`` with a symlink per image of every class but ``held_out``, except the files in ``leave``."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir() and p.name != held_out):
        for f in image_files(cls):
            if str(f) in leave:
                continue
            target = dst / cls.name / f.relative_to(cls)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    return dst


def calibration_outer(
    name: str, held_out: str, data: Path, bottleneck_dir: Path, folds: int, seed: int, work: Path
) -> dict:
    """Test ECE over every known image of a set: ``folds`` stratified outer folds (copies of an image
    together), one default run per fold on the others (no test split of its own), its exported layer
    on the fold's cached features. Returns the pooled logits before the temperature, labels and the
    temperatures, and per run the out-of-fold logits and labels the temperature was fitted on."""
    import retrain
    from retrain.crossfit import assign_folds
    from retrain.data import discover
    from retrain.splits import split_features

    classes = sorted(p.name for p in (data / name).iterdir() if p.is_dir() and p.name != held_out)
    paths = [str(f) for c in classes for f in image_files(data / name / c)]
    y = np.array([classes.index(Path(p).parent.name) for p in paths])
    table = retrain.extract_features(paths, bottleneck_dir=bottleneck_dir)
    X = table.matrix(paths)
    fold = assign_folds(y, folds, groups=[table.keys[p] for p in paths], seed=seed)
    logits_raw = np.zeros((len(y), len(classes)), np.float32)
    temperature = np.zeros(len(y))
    runs = []
    for k in range(folds):
        test = fold == k
        folder = outer_folder(
            data / name, held_out, work / f"{name}-outer-{seed}-{k}", set(np.array(paths)[test])
        )
        res = retrain.train(
            folder,
            bottleneck_dir=str(bottleneck_dir),
            output_dir=str(work / f"{name}-outer-run-{seed}-{k}"),
            seed=seed,
            testing_percentage=0,
            quiet=True,
        )
        assert res.labels == classes, (res.labels, classes)
        W, b = layer_of(res.output_graph)
        t = res.metrics["calibration"]["temperature"]
        logits_raw[test] = (X[test] @ W + b) * t  # the exported logits times T: the layer before 1/T
        temperature[test] = t
        ds = discover(folder)
        fpaths = [r.path for r in ds.records]
        sp = split_features(
            ds, retrain.extract_features(fpaths, bottleneck_dir=bottleneck_dir), testing_percentage=0
        )
        fit = sp.train + sp.validation
        oof = res.cross_fit.logits
        assert len(oof) == len(fit.y)
        runs.append(
            {"oof_logits": oof, "oof_y": fit.y, "fit_logits_raw": (fit.X @ W + b) * t, "temperature": t}
        )
    return {"logits_raw": logits_raw, "y": y, "temperature": temperature, "fold": fold, "runs": runs}


def outer_summary(name: str, out: dict) -> dict:
    """Pooled test ECE before/after the runs' temperatures, its floor, accuracy, and the out-of-fold view."""
    from retrain.calibrate import reliability, softmax

    z, y, t = out["logits_raw"], out["y"], out["temperature"][:, None]
    before, after = softmax(z), softmax(z / t)
    conf = after.max(axis=1)
    correct = after.argmax(axis=1) == y
    return {
        "set": name,
        "images": len(y),
        "accuracy": float(correct.mean()),
        "ece_before": reliability(before, y).ece,
        "ece_after": reliability(after, y).ece,
        "ece_floor": ece_floor(after),
        "ece_change_95": ece_change_interval(before, after, y),
        "cross_entropy_before": mean_cross_entropy(before, y),
        "cross_entropy_after": mean_cross_entropy(after, y),
        "mean_confidence_after": float(conf.mean()),
        "temperatures": sorted({round(float(v), 3) for v in out["temperature"]}),
        "oof_ece_before": float(
            np.mean([reliability(softmax(r["oof_logits"]), r["oof_y"]).ece for r in out["runs"]])
        ),
        "oof_ece_after": float(
            np.mean(
                [reliability(softmax(r["oof_logits"], r["temperature"]), r["oof_y"]).ece for r in out["runs"]]
            )
        ),
    }


def ece_change_interval(before, after, y, draws: int = 300, seed: int = 0) -> list[float]:
    """Bootstrap 95% interval of ECE(after) - ECE(before) over the same images (resampled together):
    whether a change of a few tenths of a point is more than the resampling noise of these images."""
    from retrain.calibrate import reliability

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        i = rng.integers(0, len(y), len(y))
        diffs.append(reliability(after[i], y[i]).ece - reliability(before[i], y[i]).ece)
    return [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


def mean_cross_entropy(proba, y) -> float:
    """Mean negative log-likelihood of the labels: the proper score a temperature is fitted to lower."""
    return float(-np.log(np.maximum(proba[np.arange(len(y)), y], 1e-12)).mean())


def leaked_test(duplicates_csv: Path) -> set[str]:
    """Test images with a copy in training or validation (the run's duplicates.csv)."""
    import csv

    if not duplicates_csv.exists():
        return set()
    out = set()
    with duplicates_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            splits = {row["split_a"]: row["path_a"], row["split_b"]: row["path_b"]}
            if "testing" in splits and len(splits) == 2:
                out.add(splits["testing"])
    return out


def ece_floor(proba: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """The mean ECE of a perfectly calibrated model on this many images: labels drawn from ``proba`` itself.
    A measured test ECE near it says the test split is too small to see any miscalibration."""
    from retrain.calibrate import reliability

    rng = np.random.default_rng(seed)
    cum = np.cumsum(proba, axis=1)
    eces = []
    for _ in range(draws):
        y = (rng.random((len(proba), 1)) > cum).sum(axis=1).clip(0, proba.shape[1] - 1)
        eces.append(reliability(proba, y).ece)
    return float(np.mean(eces))


def fitting_cost(
    n: int = 10_000, d: int = 1280, classes: int = 10, seed: int = 0, solved_c: float | None = 1.0
) -> dict:
    """The open-world stage of a run (temperature, unknown statistics, held-out threshold and
    leave-one-class-out, its layer refits included) on synthetic features, out-of-fold logits given.

    ``solved_c``: the final layer is the default L-BFGS one at that C (solved here, outside the timing), and
    the leave-one-class-out layers are solved as a run solves them; None: a stand-in layer and stepped refits
    (``--head_solver steps``)."""
    from retrain.crossfit import assign_folds
    from retrain.logreg import fit_logistic, strength
    from retrain.openworld import fit_open_world

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = np.abs(rng.normal(0, 1, (classes, d))[y] + rng.normal(0, 2, (n, d))).astype(np.float32)
    coef = (rng.normal(0, 0.05, (d, classes))).astype(np.float32)
    n_test = n // 10
    fit = slice(n_test, None)
    intercept = np.zeros(classes, np.float32)
    if solved_c is not None:
        coef, intercept, _ = fit_logistic(
            X[fit], y[fit], n_classes=classes, l2=strength(solved_c, n - n_test)
        )
    t0, c0 = time.perf_counter(), time.process_time()
    ow = fit_open_world(
        labels=[str(c) for c in range(classes)],
        X_fit=X[fit],
        y_fit=y[fit],
        held_out_logits=X[fit] @ coef,
        held_out_rows=np.arange(n - n_test),
        fold=assign_folds(y[fit], 5),
        held_out_name="out_of_fold",
        coef=coef,
        intercept=intercept,
        X_test=X[:n_test],
        y_test=y[:n_test],
        head_params={"steps": 4000},
        seed=seed,
        solved_c=solved_c,
    )
    return {
        "images": n,
        "dim": d,
        "classes": classes,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "loco_classes": len(ow.unknown.loco_auroc),
    }


def inference_cost(graph: Path, repeats: int = 7, batch: int = 32) -> dict:
    """Seconds per image with and without the unknown_score nodes (same file otherwise), alternated."""
    import onnx

    from retrain.engines import OnnxEngine
    from retrain.export import UNKNOWN_NAME

    full = onnx.load(str(graph))
    plain = onnx.load(str(graph))
    keep = [o for o in plain.graph.output if o.name != UNKNOWN_NAME]
    del plain.graph.output[:]
    plain.graph.output.extend(keep)
    # ONNX Runtime drops the nodes no output needs, so "plain" is the model without the score.
    engines = {"with": OnnxEngine(full.SerializeToString()), "without": OnnxEngine(plain.SerializeToString())}
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    times = {k: [] for k in engines}
    for e in engines.values():
        e.session.run(None, {e.input_name: pixels})  # warm up
    for _ in range(repeats):
        for k, e in engines.items():
            t0 = time.perf_counter()
            e.session.run(None, {e.input_name: pixels})
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) / batch for k, v in times.items()}
    return {
        "ms_per_image_with": round(1000 * med["with"], 3),
        "ms_per_image_without": round(1000 * med["without"], 3),
        "ratio": round(med["with"] / med["without"], 4),
        "model_bytes": graph.stat().st_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/data"))
    ap.add_argument("--bottleneck_dir", type=Path, default=None)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument(
        "--outer_folds",
        type=int,
        default=0,
        help="only the calibration: test ECE over every known image, from this many outer folds (one run each)",
    )
    ap.add_argument(
        "--save", type=Path, default=None, help="with --outer_folds: write the pooled logits here (pickle)"
    )
    ap.add_argument(
        "--guards", type=Path, default=None, help="only compare the temperature rules on a --save file"
    )
    args = ap.parse_args()
    logging.getLogger("retrain").setLevel(logging.WARNING)
    bottleneck_dir = args.bottleneck_dir or args.data / ".cache"
    if args.guards:
        import pickle

        for key, out in pickle.loads(args.guards.read_bytes()).items():
            print(key, json.dumps({**outer_summary(key, out), "guards": compare_guards(out)}))
        return
    if args.outer_folds:
        outer_main(args, bottleneck_dir)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="openworld-") as tmp:
        for name in args.sets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(one_set(name, SETS[name], args.data, bottleneck_dir, seed, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        graph = Path(tmp) / f"{rows[-1]['set']}-run-{rows[-1]['seed']}" / "output_graph.onnx"
        inference = inference_cost(graph)
    cost = fitting_cost()
    print_table(rows, cost, inference)
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "fitting_cost": cost, "inference": inference}, indent=2)
        )


def compare_guards(out: dict) -> dict:
    """Pooled test ECE (%) of each rule for keeping the out-of-fold temperature, recomputed from a
    :func:`calibration_outer` result exactly as a run computes it (same logits, labels and row order)."""
    from retrain.calibrate import carries_over, fit_temperature, reliability, softmax

    def in_sample_ece(z, y, t):  # the rule until 2026-12-02
        return t if reliability(softmax(z, t), y).ece <= reliability(softmax(z), y).ece else 1.0

    rules = {
        "T=1": lambda z, y, t: 1.0,
        "always": lambda z, y, t: t,
        "in_sample_ece": in_sample_ece,
        "carries_over": lambda z, y, t: t if carries_over(z, y) else 1.0,
    }
    result = {}
    for name, rule in rules.items():
        t_row = np.zeros(len(out["y"]))
        for k, r in enumerate(out["runs"]):
            t_row[out["fold"] == k] = rule(
                r["oof_logits"], r["oof_y"], fit_temperature(r["oof_logits"], r["oof_y"])
            )
        result[name] = round(100 * reliability(softmax(out["logits_raw"] / t_row[:, None]), out["y"]).ece, 2)
    return result


def outer_main(args, bottleneck_dir: Path) -> None:
    import pickle

    saved, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="openworld-outer-") as tmp:
        for name in args.sets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                out = calibration_outer(
                    name, SETS[name], args.data, bottleneck_dir, args.outer_folds, seed, Path(tmp)
                )
                saved[f"{name}-{seed}"] = out
                rows.append({**outer_summary(name, out), "seed": seed, "guards": compare_guards(out)})
                print(json.dumps(rows[-1]), flush=True)
                if args.save:
                    args.save.write_bytes(pickle.dumps(saved))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict], cost: dict, inference: dict) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(
        "\n| set (held-out class) | AUROC held-out: unknown_score / max-softmax / Mahalanobis / energy / kNN1 | AUROC unrelated: "
        "the same | known called unknown | held-out / unrelated called unknown "
        "| test ECE before -> after | top-1 run / model | LOCO AUROC mean |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["auroc"]
        ms = ("unknown_score", "max_softmax", "mahalanobis", "energy", "knn1")
        print(
            f"| {r['set']} ({r['held_out']}), seed {r['seed']} | "
            + " / ".join(pct(a[m]["held_out"]) for m in ms)
            + " | "
            + " / ".join(pct(a[m]["unrelated"]) for m in ms)
            + f" | {pct(r['known_called_unknown'])}% | {pct(r['held_out_called_unknown'])}% / "
            f"{pct(r['unrelated_called_unknown'])}% | {pct(r['ece_test_before'])} -> {pct(r['ece_test_after'])} "
            f"(no copies {pct(r['ece_test_clean_before'])} -> {pct(r['ece_test_clean_after'])}; floor "
            f"{pct(r['ece_test_floor'])}; out-of-fold {pct(r['ece_oof_before'])} -> {pct(r['ece_oof_after'])}) | "
            f"{pct(r['test_accuracy_run'])} / {pct(r['test_accuracy_model'])} | {pct(r['loco_auroc_mean'])} |"
        )
    for key in ("held_out", "unrelated"):
        means = {m: np.mean([r["auroc"][m][key] for r in rows]) for m in rows[0]["auroc"]}
        print(f"mean AUROC vs {key}: " + ", ".join(f"{m} {100 * v:.1f}" for m, v in means.items()))
    print(
        f"fitting cost (temperature + unknown statistics + out-of-fold threshold + leave-one-class-out): {cost}"
    )
    print(f"inference cost of unknown_score (batch 32, {os.cpu_count()} cores): {inference}")


if __name__ == "__main__":
    main()
