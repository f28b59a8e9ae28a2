"""How well the audit finds label errors and near copies on real photo folders, what it costs, and
how honest the learning curve is.

For each set (a folder of class folders):

1. cold extraction of every image into a fresh cache (the cost the audit is compared with);
2. label errors: 5% of the images get a random wrong label (in memory: the same as moving the
   files, since features are keyed on content); out-of-fold probabilities from
   ``crossfit.cross_fit`` with the default layer; recall of the moved images within the top k
   (k = the number moved) and top 2k for our ranking (1 - p[given]), the same blended with
   feature-space neighbours, and cleanlab's confident learning on the same probabilities;
3. near copies: 5% of the images copied with one change each (JPEG quality 60-90, 50-90% size,
   brightness x0.85 or x1.15, 3-10% cropped off each side) and with all four at once; recall of
   those pairs, and false pairs among the original photos, at several similarity thresholds;
4. learning curve: the saturating curve fitted on the 10%-50% points, its prediction at 100%
   against the measured 100% point.

    python benchmarks/audit.py --sets /work/data/gcompris /work/data/deepsky ... [--seeds 3]

Needs cleanlab for the comparison (``pip install cleanlab``); without it that column is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from retrain.audit import (
    NEAR_DUPLICATE_RULE,
    find_duplicates,
    fit_saturating,
    learning_curve,
    rank_label_issues,
)
from retrain.config import TrainConfig
from retrain.crossfit import cross_fit
from retrain.data import discover
from retrain.features import extract_features
from retrain.runaudit import RunData, audit_run

THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90)


def head_params() -> dict:
    d = TrainConfig()
    return dict(
        steps=d.how_many_training_steps,
        learning_rate=d.learning_rate,
        batch_size=d.train_batch_size,
        optimizer=d.optimizer,
        weight_decay=d.weight_decay or 0.0,
        class_balance=d.class_balance,
    )


def extract(paths: list[str], cache: Path):
    table = extract_features(paths, bottleneck_dir=cache, device="cpu")
    kept = [p for p in paths if p in table.keys]
    return kept, [table.keys[p] for p in kept], table.matrix(kept), table


def recall_at(order: np.ndarray, moved: set[int], k: int) -> float:
    return len(set(order[:k].tolist()) & moved) / len(moved)


def label_errors(X, y, keys, n_classes, seed):
    rng = np.random.default_rng(seed)
    k = max(1, round(0.05 * len(y)))
    moved = rng.choice(len(y), size=k, replace=False)
    noisy = y.copy()
    noisy[moved] = (y[moved] + rng.integers(1, n_classes, size=k)) % n_classes  # always another class
    t0 = time.perf_counter()
    cf = cross_fit(X, noisy, n_classes=n_classes, head_params=head_params(), groups=keys, seed=seed)
    t_cf = time.perf_counter() - t0
    proba, truth = cf.proba, set(moved.tolist())
    t0 = time.perf_counter()
    ours = rank_label_issues(proba, noisy)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    blended = rank_label_issues(proba, noisy, X=X, groups=keys, neighbours=10)
    t_nb = time.perf_counter() - t0
    out = {
        "moved": k,
        "ours_top_k": recall_at(ours.order, truth, k),
        "ours_top_2k": recall_at(ours.order, truth, 2 * k),
        "neighbours_top_k": recall_at(blended.order, truth, k),
        "neighbours_top_2k": recall_at(blended.order, truth, 2 * k),
        "suggested_right": float(np.mean([ours.suggested[i] == y[i] for i in moved])),
        "seconds_crossfit": t_cf,
        "seconds_rank": t_ours,
        "seconds_neighbours": t_nb,
        "oof_accuracy_noisy": cf.accuracy,
    }
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return out
    t0 = time.perf_counter()
    flagged = np.asarray(find_label_issues(noisy, proba, return_indices_ranked_by="self_confidence"))
    out["cleanlab_seconds"] = time.perf_counter() - t0
    out["cleanlab_flagged"] = len(flagged)
    out["cleanlab_top_k"] = recall_at(flagged, truth, k)
    out["cleanlab_top_2k"] = recall_at(flagged, truth, 2 * k)
    out["cleanlab_all_flagged"] = len(set(flagged.tolist()) & truth) / k
    return out


KINDS = ("reencode", "resize", "brighten", "crop", "all")


def make_copies(paths: list[str], out_dir: Path, seed: int, kind: str = "all") -> list[tuple[str, str]]:
    """Near copies of 5% of ``paths``: JPEG re-encoding (quality 60-90), resizing (50-90%), brightness
    (x0.85 or x1.15), cropping (3-10% off each side), or all four at once."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=max(1, round(0.05 * len(paths))), replace=False)
    pairs = []
    for n, i in enumerate(chosen):
        with Image.open(paths[i]) as im:
            im = im.convert("RGB")
            w, h = im.size
            if kind in ("crop", "all"):
                m = rng.uniform(0.03, 0.10, size=4)
                im = im.crop((int(w * m[0]), int(h * m[1]), w - int(w * m[2]), h - int(h * m[3])))
            if kind in ("resize", "all"):
                s = rng.uniform(0.5, 0.9)
                im = im.resize((max(16, int(im.width * s)), max(16, int(im.height * s))), Image.BILINEAR)
            if kind in ("brighten", "all"):
                im = ImageEnhance.Brightness(im).enhance(float(rng.choice([0.85, 1.15])))
            quality = int(rng.integers(60, 91)) if kind in ("reencode", "all") else 95
            dest = out_dir / f"{kind}_{n}.jpg"
            im.save(dest, quality=quality)
        pairs.append((paths[i], str(dest)))
    return pairs


def near_copies(X_orig, keys_orig, X_copy, keys_copy, source_rows):
    """Recall of injected pairs and false pairs among everything else, at each threshold."""
    X = np.concatenate([X_orig, X_copy])
    keys = list(keys_orig) + list(keys_copy)
    n = len(keys_orig)
    true_pairs = {(int(s), n + c) for c, s in enumerate(source_rows)}
    pairs = find_duplicates(X, keys, threshold=min(THRESHOLDS), ratio=None)  # every pair above the lowest
    near = pairs.kind == "near"
    sims = pairs.similarity[near]
    found = [(int(a), int(b)) for a, b in zip(pairs.i[near], pairs.j[near])]
    is_true = np.array([p in true_pairs for p in found], dtype=bool)
    among_originals = np.array([b < n for _, b in found], dtype=bool)
    out = {}
    for t in THRESHOLDS:
        hit = sims >= t
        out[f"{t:.2f}"] = {
            "recall": float((hit & is_true).sum() / len(true_pairs)),
            "false_pairs_originals": int((hit & among_originals).sum()),
            "false_pairs_all": int((hit & ~is_true).sum()),
        }
    product = find_duplicates(X, keys)  # the rule every run uses
    pnear = product.kind == "near"
    pfound = [(int(a), int(b)) for a, b in zip(product.i[pnear], product.j[pnear])]
    out["product"] = {
        "recall": sum(p in true_pairs for p in pfound) / len(true_pairs),
        "false_pairs_originals": sum(b < n for _, b in pfound),
        "false_pairs_all": sum(p not in true_pairs for p in pfound),
    }
    copy_sims = [float(s) for s, ok in zip(sims, is_true) if ok]
    orig_sims = sims[among_originals]
    out["max_similarity_originals"] = float(orig_sims.max()) if len(orig_sims) else None
    out["median_similarity_copies"] = float(np.median(copy_sims)) if copy_sims else None
    return out


def curve_honesty(X, y, keys, n_classes, seed):
    from retrain.crossfit import assign_folds

    fold = assign_folds(y, 5, groups=keys, seed=seed)
    curve = learning_curve(X, y, fold, n_classes=n_classes, head_params=head_params(), seed=seed)
    half = curve.fractions <= 0.5
    fit = fit_saturating(np.tile(curve.sizes[half], len(curve.accuracy)), curve.accuracy[:, half].ravel())
    measured = float(np.nanmean(curve.accuracy[:, -1]))
    return {
        "seconds": curve.seconds,
        "sizes": curve.sizes.tolist(),
        "mean_accuracy": np.nanmean(curve.accuracy, axis=0).round(4).tolist(),
        "measured_full": measured,
        "predicted_full_from_half": float(fit(curve.sizes[-1])) if fit else None,
        "at_half": float(np.nanmean(curve.accuracy[:, half][:, -1])),
    }


def run_set(folder: Path, seeds: int, work: Path, cost_only: bool = False) -> dict:
    dataset = discover(folder)
    paths = [r.path for r in dataset.records]
    labels_of = {r.path: r.label_index for r in dataset.records}
    cache = work / f"cache-{folder.name}"
    kept, keys, X, table = extract(paths, cache)
    y = np.array([labels_of[p] for p in kept])
    n_classes = len(dataset.labels)
    result = {
        "set": str(folder),
        "images": len(kept),
        "classes": n_classes,
        "cold_extraction_seconds": table.seconds,
        "cold_extraction_cpu_seconds": table.cpu_seconds,
        "extraction_images_per_s": table.computed / table.seconds,
    }
    result["cost"] = audit_cost(folder, dataset.labels, kept, keys, X, y, work)
    result["_X"] = X  # for --scale; dropped before the JSON is written
    result["audit_seconds"] = result["cost"]["audit_seconds"]
    result["audit_vs_cold_extraction"] = result["audit_seconds"] / table.seconds
    result["audit_cpu_vs_cold_extraction_cpu"] = result["cost"]["audit_cpu_seconds"] / table.cpu_seconds
    result["crossfit_vs_cold_extraction"] = result["cost"]["crossfit_seconds"] / table.seconds
    if cost_only:
        return result
    result["label_errors"] = [label_errors(X, y, keys, n_classes, seed) for seed in range(seeds)]
    row_of = {p: i for i, p in enumerate(kept)}
    result["near_copies"] = {}
    for kind in KINDS:
        copies_dir = work / f"copies-{folder.name}-{kind}"
        copies_dir.mkdir()
        injected = make_copies(kept, copies_dir, seed=0, kind=kind)
        ckept, ckeys, Xc, _ = extract([c for _, c in injected], cache)
        source = [row_of[o] for o, c in injected if c in set(ckept)]
        result["near_copies"][kind] = near_copies(X, keys, Xc, ckeys, source)
        result["near_copies"][kind]["injected"] = len(source)
    result["learning_curve"] = curve_honesty(X, y, keys, n_classes, seed=0)
    return result


def audit_cost(folder: Path, labels, paths, keys, X, y, work: Path, repeats: int = 3) -> dict:
    """The product's audit (``runaudit.audit_run``: one similarity pass for neighbours and near copies,
    label ranking, duplicates, learning curve, its files) on the folder's features, after the run's
    one cross-fit; the median of ``repeats`` runs."""
    cf = cross_fit(X, y, n_classes=len(labels), head_params=head_params(), groups=keys, seed=0)
    data = RunData(
        image_dir=str(folder),
        labels=labels,
        paths=paths,
        split=["training"] * len(paths),
        y=y,
        keys=keys,
        X=X,
        proba=cf.proba,
        fold=cf.fold,
        head_params=head_params(),
        train_count=len(y),
    )
    runs = []
    for r in range(repeats):
        out = work / f"audit-{folder.name}-{r}"
        out.mkdir()
        cpu0 = time.process_time()
        seconds = audit_run(data, out)["seconds"]
        runs.append({**seconds, "cpu": time.process_time() - cpu0})
    mid = sorted(runs, key=lambda s: s["total"])[len(runs) // 2]
    return {
        "audit_seconds": mid["total"],
        "audit_cpu_seconds": float(np.median([r["cpu"] for r in runs])),
        "parts": mid,
        "crossfit_seconds": cf.seconds,
    }


def scale_cost(results: list[dict], rows: int, work: Path) -> dict:
    """The audit on ``rows`` rows made of the sets' real features (resampled, each jittered by 5% of
    the features' spread, 10 classes), against the sets' pooled cold extraction rate."""
    rng = np.random.default_rng(0)
    pool = []
    for r in results:
        pool.append(r.pop("_X"))
    X0 = np.concatenate(pool)
    pick = rng.integers(0, len(X0), size=rows)
    X = (X0[pick] + 0.05 * X0.std(axis=0) * rng.normal(size=(rows, X0.shape[1]))).astype(np.float32)
    y = rng.integers(0, 10, size=rows)
    keys = [i.to_bytes(20, "big") for i in range(rows)]
    paths = [f"/synthetic/{c}/{i}.jpg" for i, c in enumerate(y)]
    images = sum(r["images"] for r in results)
    rate = images / sum(r["cold_extraction_seconds"] for r in results)
    cpu_per_image = sum(r["cold_extraction_cpu_seconds"] for r in results) / images
    cost = audit_cost(Path("/synthetic"), [str(c) for c in range(10)], paths, keys, X, y, work, repeats=1)
    return {
        "rows": rows,
        "images_per_s": rate,
        "extraction_cpu_seconds_per_image": cpu_per_image,
        **cost,
        "audit_vs_cold_extraction": cost["audit_seconds"] / (rows / rate),
        "audit_cpu_vs_cold_extraction_cpu": cost["audit_cpu_seconds"] / (rows * cpu_per_image),
    }


def cost_table(results: list[dict]) -> str:
    lines = [
        "| set | images | cold extraction s (CPU s) | audit s (CPU s) | similarity pass / curve s | "
        "audit / extraction, wall | CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["cost"]
        lines.append(
            f"| {Path(r['set']).name} | {r['images']} | {r['cold_extraction_seconds']:.1f} "
            f"({r['cold_extraction_cpu_seconds']:.1f}) | {c['audit_seconds']:.2f} ({c['audit_cpu_seconds']:.2f}) | "
            f"{c['parts']['similarity_pass']:.2f} / {c['parts']['learning_curve']:.2f} | "
            f"{100 * r['audit_vs_cold_extraction']:.1f}% | {100 * r['audit_cpu_vs_cold_extraction_cpu']:.1f}% |"
        )
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    def mean_sd(rows, key):
        v = np.array([r[key] for r in rows if key in r], dtype=float)
        return f"{100 * v.mean():.0f}±{100 * v.std():.0f}" if len(v) else "–"

    lines = [
        "| set | images | moved | ours top-k | ours top-2k | +neighbours top-k | +neighbours top-2k | cleanlab CL "
        "top-k | cleanlab CL top-2k | suggestion right |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        le = r["label_errors"]
        lines.append(
            f"| {Path(r['set']).name} | {r['images']} | {le[0]['moved']} | {mean_sd(le, 'ours_top_k')} | "
            f"{mean_sd(le, 'ours_top_2k')} | {mean_sd(le, 'neighbours_top_k')} | {mean_sd(le, 'neighbours_top_2k')} | "
            f"{mean_sd(le, 'cleanlab_top_k')} | {mean_sd(le, 'cleanlab_top_2k')} | {mean_sd(le, 'suggested_right')} |"
        )
    lines += [
        "",
        "| set | copies of | product rule: recall / false pairs | "
        + " | ".join(f"≥{t:.2f}: recall / false pairs" for t in THRESHOLDS)
        + " |",
        "|---|---|---|" + "---|" * len(THRESHOLDS),
    ]
    for r in results:
        for kind, nc in r["near_copies"].items():
            cells = " | ".join(
                f"{100 * nc[f'{t:.2f}']['recall']:.0f}% / {nc[f'{t:.2f}']['false_pairs_originals']}"
                for t in THRESHOLDS
            )
            pr = nc["product"]
            lines.append(
                f"| {Path(r['set']).name} | {nc['injected']} {kind} | "
                f"{100 * pr['recall']:.0f}% / {pr['false_pairs_originals']} | {cells} |"
            )
    lines += [
        "",
        "| set | pairs of distinct originals | max similarity of distinct originals |",
        "|---|---|---|",
    ]
    for r in results:
        n, top = r["images"], r["near_copies"]["all"]["max_similarity_originals"]
        lines.append(f"| {Path(r['set']).name} | {n * (n - 1) // 2} | {top:.3f} |")
    lines += [
        "",
        "| set | cold extraction s | audit s | of which similarity pass / curve s | audit / extraction | "
        "cross-fit / extraction | curve at 50% | predicted 100% from ≤50% | measured 100% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lc = r["learning_curve"]
        pred = lc["predicted_full_from_half"]
        lines.append(
            f"| {Path(r['set']).name} | {r['cold_extraction_seconds']:.1f} | {r['audit_seconds']:.2f} | "
            f"{r['cost']['parts']['similarity_pass']:.2f} / {r['cost']['parts']['learning_curve']:.2f} | "
            f"{100 * r['audit_vs_cold_extraction']:.1f}% | {100 * r['crossfit_vs_cold_extraction']:.1f}% | "
            f"{100 * lc['at_half']:.1f}% | {'–' if pred is None else f'{100 * pred:.1f}%'} | "
            f"{100 * lc['measured_full']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", required=True, help="folders of class folders")
    p.add_argument("--seeds", type=int, default=3, help="label-noise draws per set")
    p.add_argument("--json", default="", help="also write all numbers here")
    p.add_argument(
        "--scale",
        type=int,
        default=0,
        help="also time the audit on this many synthetic rows (features of the sets' images, jittered), "
        "against extracting as many images at the sets' measured cold rate",
    )
    p.add_argument("--cost_only", action="store_true", help="only extraction and the audit's cost")
    ns = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        for folder in ns.sets:
            t0 = time.perf_counter()
            results.append(run_set(Path(folder), ns.seeds, Path(tmp), cost_only=ns.cost_only))
            print(f"{folder}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        scale = scale_cost(results, ns.scale, Path(tmp)) if ns.scale else None
    for r in results:
        r.pop("_X", None)
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=1))
    print(f"near-copy rule in the product: {NEAR_DUPLICATE_RULE}")
    if not ns.cost_only:
        print(summary_table(results))
    print(cost_table(results))
    if scale:
        if ns.json:
            Path(ns.json).with_suffix(".scale.json").write_text(json.dumps(scale, indent=1))
        print(
            f"\n{scale['rows']} rows: audit {scale['audit_seconds']:.2f} s (similarity pass "
            f"{scale['parts']['similarity_pass']:.2f} s, learning curve {scale['parts']['learning_curve']:.2f} s) = "
            f"{100 * scale['audit_vs_cold_extraction']:.1f}% of extracting {scale['rows']} images at "
            f"{scale['images_per_s']:.0f} images/s; CPU {scale['audit_cpu_seconds']:.2f} s = "
            f"{100 * scale['audit_cpu_vs_cold_extraction_cpu']:.1f}% of the extraction's "
            f"{scale['extraction_cpu_seconds_per_image'] * scale['rows']:.0f} CPU s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
