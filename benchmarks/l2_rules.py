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

from retrain.crossfit import C_GRID  # noqa: E402


def _stopped(scores: np.ndarray, better, patience: int, after_first_gain: bool = False) -> tuple[int, int]:
    """(the index a path stopping ``patience`` values after the last better one keeps, values it walked);
    ``after_first_gain``: never stopping before some value has beaten the first."""
    best = 0
    for i in range(1, len(scores)):
        if better(scores[i], scores[best]):
            best = i
        if i - best >= patience and (best > 0 or not after_first_gain):
            return best, i + 1
    return best, len(scores)


def _loss_rule(tolerance: float, patience: int, after_first_gain: bool = False):
    return lambda acc, loss: _stopped(loss, lambda v, b: v < b * (1 - tolerance), patience, after_first_gain)


def rules() -> dict:
    """Rule name -> f(out-of-fold accuracy (S,), cross entropy (S,)) -> (chosen index, C values walked)."""
    from retrain.crossfit import L2_PATIENCE, L2_TOLERANCE, PATIENCE, TOLERANCE

    everything = len(C_GRID)
    return {
        f"cross entropy, {100 * L2_TOLERANCE:g}% better, patience {L2_PATIENCE}, after a first gain (shipped)": (
            _loss_rule(L2_TOLERANCE, L2_PATIENCE, after_first_gain=True)
        ),
        "cross entropy, 0.1% better, patience 2": _loss_rule(1e-3, 2),
        "cross entropy, 1% better, patience 2": _loss_rule(1e-2, 2),
        "cross entropy, 2% better, patience 1": _loss_rule(2e-2, 1),
        "cross entropy, 5% better, patience 1": _loss_rule(5e-2, 1),
        "lowest cross entropy on the whole grid": lambda acc, loss: (int(np.argmin(loss)), everything),
        "accuracy +0.2 points, patience 3 (until 2026-12-03)": lambda acc, loss: _stopped(
            acc, lambda v, b: v > b + TOLERANCE, PATIENCE
        ),
        "highest accuracy on the whole grid (the probe's rule)": lambda acc, loss: (
            int(np.argmax(acc)),
            everything,
        ),
    }


def run_set(
    folder: Path, seeds: list[int], k: int, bottlenecks: Path, probe_cache: Path
) -> tuple[dict, dict]:
    from retrain.crossfit import cross_fit_l2
    from retrain.fit import labelled_groups
    from retrain.logreg import fit_logistic, strength

    labels, paths, y = _images(folder)
    ok, X, keys = _features(paths, bottlenecks)
    paths, y = [paths[i] for i in ok], np.array([y[i] for i in ok])
    hits: dict[str, list[np.ndarray]] = {name: [] for name in [*rules(), "probe"]}
    steps: dict[str, list[int]] = {name: [] for name in rules()}
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
                index, walked = rule(cf.curve_accuracy, cf.curve_loss)
                c = float(cf.curve_c[index])
                steps[name].append(walked)
                if c not in solved:
                    W, b, _ = fit_logistic(X[tr], y[tr], n_classes=len(labels), l2=strength(c, len(tr)))
                    solved[c] = (X[te] @ W + b).argmax(axis=1) == y[te]
                hits[name].append(solved[c])
            hits["probe"].append(_probe_hits(X, y, tr, te, probe_cache / f"{folder.name}_{seed}_{f}.npy"))
    return {name: np.concatenate(h) for name, h in hits.items()}, {
        n: float(np.mean(v)) for n, v in steps.items()
    }


def _probe_hits(X, y, tr, te, cached: Path) -> np.ndarray:
    """The probe's test hits for one outer fold, kept in ``cached`` (the probe is most of the cost)."""
    if cached.exists():
        return np.load(cached)
    probe, _ = _probe(X[tr], y[tr])
    hits = probe.predict(X[te]) == y[te]
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached, hits)
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--outer_folds", type=int, default=5)
    ap.add_argument("--bottleneck_dir", type=Path, default=Path("/tmp/retrain-l2-rules"))
    ap.add_argument("--probe_cache", type=Path, default=Path("/tmp/retrain-l2-rules/probe"))
    args = ap.parse_args()
    results, walked = {}, {}
    for folder in args.sets:
        results[folder.name], walked[folder.name] = run_set(
            folder, args.seeds, args.outer_folds, args.bottleneck_dir, args.probe_cache
        )
    names = list(rules())
    print("| rule | " + " | ".join(results) + " | mean | C values walked (mean, per set) |")
    print("|---|" + "---|" * (len(results) + 2))
    for name in names:
        cells, diffs = [], []
        for hits in results.values():
            ours, probe = hits[name], hits["probe"]
            diff = 100 * (ours.mean() - probe.mean())
            diffs.append(diff)
            cells.append(f"{diff:+.2f} ({int((ours & ~probe).sum())}/{int((~ours & probe).sum())})")
        steps = " / ".join(f"{walked[s][name]:.1f}" for s in results)
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(diffs):+.2f} | {steps} |")


if __name__ == "__main__":
    main()
