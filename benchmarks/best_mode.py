#!/usr/bin/env python3
"""``--quality best`` against the tuned probe and the default run on real photo sets (docs/finetune.md).

    python benchmarks/best_mode.py /work/data/textures /work/data/deepsky --seeds 0 1 --json out.json
    python benchmarks/best_mode.py /work/data/digits --seeds 0 --no_fine_tune   # the backbone choice only

For every set and split seed the images are split as benchmarks/accuracy.py does: a disjoint test set
(``--test_fraction`` of each class, by a hash of the seed and the image's group) and a training folder.
Each column is scored on that test set, which none of them saw or chose anything by:

* **probe, Lite0**: ``LogisticRegressionCV`` (C from 1e-3..1e2 by 5-fold CV) on EfficientNet-Lite0 features of
  100% of the training folder: issue 13's baseline;
* **probe, chosen backbone**: the same probe on the features of the backbone best mode chose (context: how
  much of the gain is the backbone's);
* **default run**: ``retrain.train`` on the training folder with default flags (Lite0; its own 10% test split);
* **best mode**: ``retrain.train(..., quality="best")`` on the same folder; with ``--no_fine_tune`` only its
  backbone choice and frozen model (``fine_tune_epochs`` is not touched: the fine-tuning stage is skipped
  by scoring the frozen model of the chosen backbone, i.e. the default run with ``architecture=chosen``).

A frozen model is scored by its exported layer on the cached features of its backbone; a fine-tuned one
by running the exported ONNX model on the test photos (pixels in).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import _exported_layer, _images, _link_training_folder, _outer_split, _probe  # noqa: E402

LITE0 = "efficientnet_lite0"


def _features(paths: list[Path], backbone: str, cache: str) -> np.ndarray:
    from retrain import extract_features

    table = extract_features([str(p) for p in paths], architecture=backbone, bottleneck_dir=cache)
    return table.matrix([str(p) for p in paths])


def _score_run(result, test_paths: list[Path], y_test: np.ndarray, labels: list[str], cache: str) -> float:
    """Test accuracy of a finished run's exported model on the outer test set."""
    import retrain

    clf = retrain.load(result.output_graph)
    run_labels = list(clf.labels)
    to_set = np.array([labels.index(label) for label in run_labels])
    if clf.manifest.get("fine_tuned"):  # the backbone itself changed: run the whole model on the photos
        got = [labels.index(r[0].label) for r in clf.classify([str(p) for p in test_paths])]
        return float(np.mean(np.array(got) == y_test))
    W, b, _ = _exported_layer(result.output_graph)
    X = _features(test_paths, result.config.architecture, cache)
    return float((to_set[(X @ W + b).argmax(axis=1)] == y_test).mean())


def _run(name: str, *, row: dict, train_dir: Path, prefix: Path, seed: int, test: tuple, **flags):
    """``retrain.train`` on the training folder; its time and outer-test accuracy go into ``row``."""
    import retrain

    t0, c0 = time.perf_counter(), time.process_time()
    result = retrain.train(
        train_dir,
        bottleneck_dir=test[3],
        output_dir=f"{prefix}-{name}",
        seed=seed,
        quiet=True,
        no_report=True,
        **flags,
    )
    row[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    row[f"{name}_cpu_seconds"] = round(time.process_time() - c0, 1)
    row[name] = _score_run(result, *test)
    return result


def _probe_score(memo: Path, X_train, y_train, X_test, y_test) -> float:
    """The probe is slow on a loaded machine: once per (set, seed, backbone), kept in ``memo``."""
    if memo.exists():
        return json.loads(memo.read_text())["probe"]
    lr, c = _probe(X_train, y_train)
    acc = float((lr.predict(X_test) == y_test).mean())
    memo.write_text(json.dumps({"probe": acc, "C": c}))
    return acc


def run_set(folder: Path, args, work: Path) -> dict:
    labels, paths, y = _images(folder)
    y = np.array(y)
    from retrain import extract_features

    table = extract_features([str(p) for p in paths], bottleneck_dir=args.bottleneck_dir)
    keys = [table.keys[str(p)] for p in paths]
    out = {"set": folder.name, "images": len(y), "classes": len(labels), "runs": []}
    for seed in args.seeds:
        test = _outer_split(paths, keys, y, args.test_fraction, seed)
        tr, te = np.flatnonzero(~test), np.flatnonzero(test)
        test_paths = [paths[i] for i in te]
        train_dir = work / f"split-{folder.name}-{seed}"
        if not train_dir.exists():
            _link_training_folder(train_dir, [paths[i] for i in tr], labels, y[tr])
        row: dict = {"seed": seed, "train_folder": len(tr), "test": len(te)}

        scored = (test_paths, y[te], labels, args.bottleneck_dir)
        run = functools.partial(
            _run,
            row=row,
            train_dir=train_dir,
            # --no_fine_tune's "best" is another model: its own folders, so a full run's are not reused
            prefix=work / f"run-{folder.name}-{seed}{'-frozen' if args.no_fine_tune else ''}",
            seed=seed,
            test=scored,
        )
        run("default")
        if args.no_fine_tune:
            from retrain import quality
            from retrain.config import TrainConfig
            from retrain.data import discover

            cfg = TrainConfig(bottleneck_dir=args.bottleneck_dir, seed=seed, quiet=True)
            ds = discover(train_dir)
            own = extract_features(ds, bottleneck_dir=args.bottleneck_dir)
            spec, _, choice = quality.choose_backbone(cfg, ds, _spec(), own, seed)
            row["choice"] = choice.to_dict()
            run("best", architecture=spec.name)  # best mode's frozen model on the chosen backbone
        else:
            result = run("best", quality="best")
            report = json.loads((result.run_dir / "fine_tune.json").read_text())
            row["choice"] = report.pop("backbone_choice")
            row["fine_tune"] = {k: v for k, v in report.items() if k != "history"}
            row["fine_tune"]["validation_history"] = [
                h["validation_accuracy"] for h in report.get("history", [])
            ]
        chosen = row["choice"]["backbone"]
        X0 = _features(paths, LITE0, args.bottleneck_dir)
        row["probe_lite0"] = _probe_score(
            work / f"probe-{folder.name}-{seed}-{LITE0}.json", X0[tr], y[tr], X0[te], y[te]
        )
        Xc = X0 if chosen == LITE0 else _features(paths, chosen, args.bottleneck_dir)
        row["probe_chosen"] = _probe_score(
            work / f"probe-{folder.name}-{seed}-{chosen}.json", Xc[tr], y[tr], Xc[te], y[te]
        )
        print(json.dumps({"set": folder.name, **row}), file=sys.stderr, flush=True)
        out["runs"].append(row)
    return out


def _spec():
    from retrain.backbones import get_backbone

    return get_backbone(LITE0)


def table(results: list[dict]) -> str:
    def cell(values: list[float]) -> str:
        v = [100 * x for x in values]
        return f"{statistics.mean(v):.1f}%" + (f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else "")

    lines = [
        "| set (test images) | seeds | probe, Lite0 | probe, chosen backbone | default run (Lite0) | **best mode** "
        "| best - Lite0 probe, points | backbone chosen (out-of-fold) | fine-tuning kept | best mode time |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        runs = r["runs"]
        diff = statistics.mean(100 * (x["best"] - x["probe_lite0"]) for x in runs)
        chosen = "; ".join(
            f"{x['choice']['backbone']} "
            + "/".join(f"{100 * a:.1f}" for a in x["choice"]["out_of_fold"].values())
            for x in runs
        )
        kept = ", ".join(
            "–" if "fine_tune" not in x else ("yes" if x["fine_tune"].get("fine_tuned") else "no")
            for x in runs
        )
        lines.append(
            f"| {r['set']} ({'/'.join(str(x['test']) for x in runs)}) | {','.join(str(x['seed']) for x in runs)} "
            f"| {cell([x['probe_lite0'] for x in runs])} | {cell([x['probe_chosen'] for x in runs])} "
            f"| {cell([x['default'] for x in runs])} | **{cell([x['best'] for x in runs])}** | {diff:+.1f} "
            f"| {chosen} | {kept} | {', '.join(str(round(x['best_seconds'])) for x in runs)} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--bottleneck_dir", default=os.environ.get("RETRAIN_BENCH_CACHE", "/work/data/.cache"))
    p.add_argument(
        "--no_fine_tune", action="store_true", help="best mode's backbone choice and frozen model only"
    )
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("retrain").setLevel(logging.INFO if not args.no_fine_tune else logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="retrain-best-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [run_set(Path(s), args, work) for s in args.sets]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"load average at the end {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
