"""How the L-BFGS layer's C is chosen from the cross-fit's path, rule by rule, against the tuned probe.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/l2_rules.py SET [SET ...] [--seeds 0 1 2] \
        [--outer_folds 5] [--bottleneck_dir DIR]

The outer folds of benchmarks/accuracy.py (every image tested once per seed). Inside each training fold, a
90% subset stands in for retrain's training + validation (the groups of accuracy.py's split; the other 10% is
the part retrain would test on). One cross-fit over the whole C grid on that subset
(``crossfit.cross_fit_l2`` with no early stop) gives the out-of-fold accuracy and cross entropy at every C;
each rule picks a C from that curve; the layer is solved at that C on 100% of the training fold (what
``--final_fit all`` exports) and scored on the test fold. The probe is benchmarks/accuracy.py's
``LogisticRegressionCV`` on 100% of the training fold.

The early stop of the shipped rule is replayed on the full curve, so every rule sees the same fold solutions.
Prints, per set, each rule minus the probe (points, all seeds pooled) and the test images only the rule /
only the probe got right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import _features, _images, _outer_folds, _outer_split, _probe  # noqa: E402


def _stopped(scores: np.ndarray, better, patience: int) -> int:
    """The index a path stopping ``patience`` values after the last better one keeps."""
    best = 0
    for i in range(1, len(scores)):
        if better(scores[i], scores[best]):
            best = i
        if i - best >= patience:
            break
    return best


def rules() -> dict:
    from retrain.crossfit import L2_PATIENCE, L2_TOLERANCE, PATIENCE, TOLERANCE

    return {
        "cross entropy (shipped)": lambda acc, loss: _stopped(
            loss, lambda v, b: v < b * (1 - L2_TOLERANCE), L2_PATIENCE
        ),
        "accuracy +0.2 points, patience 3 (before)": lambda acc, loss: _stopped(
            acc, lambda v, b: v > b + TOLERANCE, PATIENCE
        ),
        "highest accuracy (the probe's rule)": lambda acc, loss: int(np.argmax(acc)),
        "lowest cross entropy within 0.2 points of the best accuracy": lambda acc, loss: int(
            min(np.flatnonzero(acc >= acc.max() - TOLERANCE), key=lambda i: loss[i])
        ),
    }


def run_set(folder: Path, seeds: list[int], k: int, bottlenecks: Path) -> dict:
    from retrain.crossfit import cross_fit_l2
    from retrain.fit import labelled_groups
    from retrain.logreg import fit_logistic, strength

    labels, paths, y = _images(folder)
    ok, X, keys = _features(paths, bottlenecks)
    paths, y = [paths[i] for i in ok], np.array([y[i] for i in ok])
    hits: dict[str, list[np.ndarray]] = {name: [] for name in [*rules(), "probe"]}
    for seed in seeds:
        fold = _outer_folds(paths, keys, y, k, seed)
        for f in range(k):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            p_tr, k_tr = [paths[i] for i in tr], [keys[i] for i in tr]
            sub = np.flatnonzero(~_outer_split(p_tr, k_tr, y[tr], 0.1, seed))
            groups = labelled_groups([k_tr[i] for i in sub], [str(p_tr[i]) for i in sub])
            cf = cross_fit_l2(
                X[tr][sub], y[tr][sub], n_classes=len(labels), groups=groups, seed=seed, patience=99
            )
            solved: dict[float, np.ndarray] = {}
            for name, rule in rules().items():
                c = float(cf.curve_c[rule(cf.curve_accuracy, cf.curve_loss)])
                if c not in solved:
                    W, b, _ = fit_logistic(X[tr], y[tr], n_classes=len(labels), l2=strength(c, len(tr)))
                    solved[c] = (X[te] @ W + b).argmax(axis=1) == y[te]
                hits[name].append(solved[c])
            probe, _ = _probe(X[tr], y[tr])
            hits["probe"].append(probe.predict(X[te]) == y[te])
    return {name: np.concatenate(h) for name, h in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--outer_folds", type=int, default=5)
    ap.add_argument("--bottleneck_dir", type=Path, default=Path("/tmp/retrain-l2-rules"))
    args = ap.parse_args()
    results = {
        folder.name: run_set(folder, args.seeds, args.outer_folds, args.bottleneck_dir)
        for folder in args.sets
    }
    names = list(rules())
    print("| rule | " + " | ".join(results) + " | mean |")
    print("|---|" + "---|" * (len(results) + 1))
    for name in names:
        cells, diffs = [], []
        for hits in results.values():
            ours, probe = hits[name], hits["probe"]
            diff = 100 * (ours.mean() - probe.mean())
            diffs.append(diff)
            cells.append(f"{diff:+.2f} ({int((ours & ~probe).sum())}/{int((~ours & probe).sum())})")
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(diffs):+.2f} |")


if __name__ == "__main__":
    main()
