"""Issue 2's accuracy bar: retrain's defaults vs a well-tuned logistic regression on the same features.

    python benchmarks/accuracy_vs_logreg.py --image_dir PHOTOS [--test_fraction 0.2] [--seed 0] [--repeats 5]

Splits PHOTOS (one sub-folder per class) 80/20 into train/ and test/ folders (a stable hash split, fixed by
--seed), runs `retrain --image_dir train` with default flags and `label_image --json` on test/, once per
training seed 0..repeats-1 (retrain's own validation split and its sampling both depend on nothing else, so
one run is one draw: the mean over seeds is the figure, with its range), then fits
scikit-learn's LogisticRegression on the same backbone's features of train/, with C chosen by 5-fold
cross-validation, and scores it on test/. Needs scikit-learn (`pip install scikit-learn`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def split_folder(src: Path, dst: Path, test_fraction: float, seed: int) -> None:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        for f in sorted(p for p in cls.rglob("*") if p.is_file()):
            h = int(hashlib.sha1(f"{seed}/{f.relative_to(src)}".encode()).hexdigest(), 16) % 10_000
            part = "test" if h < test_fraction * 10_000 else "train"
            target = dst / part / cls.name / f.relative_to(cls)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)


def features_of(folder: Path, bottleneck_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import retrain

    ds = retrain.discover(folder)
    table = retrain.extract_features(ds, bottleneck_dir=bottleneck_dir)
    rows = [r for r in ds.records if r.path in table.keys]
    X = table.matrix([r.path for r in rows])
    return X, np.array([r.label_index for r in rows]), ds.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image_dir", required=True, type=Path)
    ap.add_argument("--test_fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="retrain runs with --seed 0..N-1 (default 5)")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegressionCV

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split_folder(args.image_dir, tmp / "data", args.test_fraction, args.seed)
        bn = tmp / "bottlenecks"
        env = {**os.environ}
        test_root = tmp / "data" / "test"
        runs, seconds = [], []
        for seed in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "retrain",
                    "--image_dir",
                    str(tmp / "data" / "train"),
                    "--bottleneck_dir",
                    str(bn),
                    "--output_dir",
                    str(tmp / "run"),
                    "--seed",
                    str(seed),
                    "--quiet",
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            seconds.append(time.perf_counter() - t0)
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from retrain.cli import label_image_main as m; sys.exit(m())",
                    "--graph",
                    str(tmp / "run" / "output_graph.onnx"),
                    "--json",
                    "--image",
                    str(test_root),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            rows = [json.loads(line) for line in out.stdout.splitlines()]
            runs.append(
                np.mean(
                    [
                        Path(r["image"]).relative_to(test_root).parts[0] == r["predictions"][0]["label"]
                        for r in rows
                    ]
                )
            )
        ours = float(np.mean(runs))
        X, y, labels = features_of(tmp / "data" / "train", bn)
        Xt, yt_local, labels_t = features_of(test_root, bn)
        yt = np.array([labels.index(labels_t[i]) for i in yt_local])
        lr = LogisticRegressionCV(Cs=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30], cv=5, max_iter=5000).fit(X, y)
        best_c = float(np.ravel(lr.C_)[0])
        theirs = float((lr.predict(Xt) == yt).mean())
    print(f"dataset {args.image_dir}: {len(y)} train / {len(yt)} test images, {len(labels)} classes")
    print("| method | test accuracy |")
    print("|---|---|")
    spread = (
        f" (seeds 0-{len(runs) - 1}: {100 * min(runs):.1f}-{100 * max(runs):.1f}%)" if len(runs) > 1 else ""
    )
    print(
        f"| retrain, default flags ({seconds[0]:.1f} s cold, {np.mean(seconds[1:] or seconds):.1f} s warm) "
        f"+ label_image --json, mean of {len(runs)} | {100 * ours:.1f}%{spread} |"
    )
    print(f"| LogisticRegressionCV (C={best_c:g}) on the same features | {100 * theirs:.1f}% |")
    print(f"difference: {100 * (ours - theirs):+.1f} points (bar: >= -1.0)")


if __name__ == "__main__":
    main()
