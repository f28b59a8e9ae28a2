"""How honest the learning curve is, stepped layers vs the solved (L-BFGS) layer the run exports.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/learning_curve.py SET [SET ...] \
        [--seeds 0 1] [--bottleneck_dir DIR]

Per set and fold seed, on cached features: 5 folds as the run's cross-fit deals them; ``audit.learning_curve``
with the step solver's short fits (70 steps of 40) and with layers solved at the C the cross-fit chooses
(what a default run does since 2026-12-03). The saturating curve is fitted on the 10-50% points only and its
prediction at 100% is compared with the measured 100% point; the 100% point itself is the layer's accuracy
on the held-out fold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import _features, _images  # noqa: E402
from audit import head_params  # noqa: E402


def main() -> None:
    from retrain.audit import fit_saturating, learning_curve
    from retrain.crossfit import assign_folds, cross_fit_l2
    from retrain.fit import labelled_groups

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--bottleneck_dir", type=Path, default=Path("/tmp/retrain-learning-curve"))
    args = ap.parse_args()
    print("| set, seed | layer | 100% point | predicted from 10-50% | error, points | seconds |")
    print("|---|---|---|---|---|---|")
    errors: dict[str, list[float]] = {"steps": [], "solved": []}
    for folder in args.sets:
        labels, paths, y = _images(folder)
        ok, X, keys = _features(paths, args.bottleneck_dir)
        paths, y = [paths[i] for i in ok], np.array([y[i] for i in ok])
        groups = labelled_groups(keys, [str(p) for p in paths])
        for seed in args.seeds:
            fold = assign_folds(y, 5, groups=groups, seed=seed)
            c = cross_fit_l2(X, y, n_classes=len(labels), groups=groups, seed=seed).c
            for name, solved in (("steps", None), ("solved", c)):
                curve = learning_curve(
                    X, y, fold, n_classes=len(labels), head_params=head_params(), seed=seed, solved_c=solved
                )
                half = curve.fractions <= 0.5
                fit = fit_saturating(
                    np.tile(curve.sizes[half], len(curve.accuracy)), curve.accuracy[:, half].ravel()
                )
                full = float(np.nanmean(curve.accuracy[:, -1]))
                predicted = float(fit(curve.sizes[-1])) if fit else float("nan")
                errors[name].append(abs(predicted - full))
                print(
                    f"| {folder.name}, {seed} | {name} | {100 * full:.1f}% | {100 * predicted:.1f}% | "
                    f"{100 * (predicted - full):+.1f} | {curve.seconds:.2f} |"
                )
    for name, e in errors.items():
        print(f"mean absolute error, {name}: {100 * np.nanmean(e):.2f} points")


if __name__ == "__main__":
    main()
