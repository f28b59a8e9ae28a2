"""How the default cross-fit stops and what it chooses: stopping rules and decay grids compared on cached features.

    python benchmarks/crossfit_rules.py SET [SET ...] --bottleneck_dir CACHE [--seeds 0 1 2] [--work DIR]

The outer split of ``benchmarks/accuracy.py`` (a disjoint 20% test set per split seed) and retrain's own split of
the training folder, as in ``benchmarks/accuracy_options.py``. For every set and seed, one batched run fits the 5
fold layers at weight decays 0, 1e-4, 1e-3 and 1e-2 to the full 4,000 steps, scoring every checkpoint out of fold
and on the test rows (kept in ``--work``, with the probe's score, so a second call only re-reads them). Each rule
below is then replayed on those curves: the point it chooses, where it would have stopped (its cost), and the test
accuracy of (a) the final layer fitted on all training + validation rows for the chosen steps (what the run
exports) and (b) the mean logits of the fold layers. Printed: test accuracy minus ``LogisticRegressionCV`` on
100% of the training folder, points, mean [min, max] over seeds, and the mean steps run x decays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_options as ao  # noqa: E402
from accuracy import _features, _images, _link_training_folder, _outer_split  # noqa: E402

GRID = [0.0, 1e-4, 1e-3, 1e-2]
# name: (decay indices, patience in checkpoints, accuracy tolerance, tie-break by lower cross entropy)
RULES = {
    "before: 4 decays, patience 6, loss tie-break": ([0, 1, 2, 3], 6, 0.0, True),
    "decay 0, patience 6, loss tie-break": ([0], 6, 0.0, True),
    "decay 0, patience 3, loss tie-break": ([0], 3, 0.0, True),
    "decay 0, patience 3, tolerance 0.002, loss tie-break": ([0], 3, 0.002, True),
    "decay 0, patience 3, no tie-break": ([0], 3, 0.0, False),
    "decay 0, patience 4, tolerance 0.002, no tie-break": ([0], 4, 0.002, False),
    "default now: decay 0, patience 3, tolerance 0.002, no tie-break": ([0], 3, 0.002, False),
    "decay 0, all 4,000 steps": ([0], 100, 0.0, False),
}


def _xent(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return (np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, y[..., None], -1)[..., 0]).mean(-1)


def choose(acc, loss, decays, patience, tol, tie):
    """((decay, checkpoint) chosen, checkpoint where the fits stop), as retrain.crossfit.cross_fit replays it."""
    best, score = None, None
    for s in range(acc.shape[1]):
        for g in decays:
            better = score is None or acc[g, s] > score[0] + tol
            better |= tie and score is not None and acc[g, s] == score[0] and -loss[g, s] > score[1]
            if better:
                best, score = (g, s), (acc[g, s], -loss[g, s])
        if s - best[1] >= patience:
            return best, s
    return best, acc.shape[1] - 1


def curves(name: str, seed: int, X, y, paths, keys, labels, args) -> dict:
    out = args.work / f"curves-{name}-{seed}.npz"
    if not out.exists():
        test = _outer_split(paths, keys, y, 0.2, seed)
        tr = np.flatnonzero(~test)
        train_dir = args.work / f"split-{name}-{seed}"
        if not train_dir.exists():
            _link_training_folder(train_dir, [paths[i] for i in tr], labels, y[tr])
        labelled, groups, run_labels = ao._internal_split(train_dir, args.bottleneck_dir)
        key_row = {k: i for i, k in enumerate(keys)}
        rows_l = np.array([key_row[k] for k in labelled.keys])
        ao.PATIENCE = 10_000  # every checkpoint
        marks, oof, test_logits = ao._cross_fit_grid(
            X[rows_l], labelled.y, X[test], groups, len(run_labels), seed, GRID
        )
        lr = ao._probe(X[tr], y[tr])
        np.savez(
            out, marks=marks, oof=oof, test=test_logits, yl=labelled.y, yt=y[test], rows_l=rows_l,
            test_idx=np.flatnonzero(test), to_set=np.array([labels.index(r) for r in run_labels]),
            probe=float((lr.predict(X[test]) == y[test]).mean()),
        )  # fmt: skip
    return dict(np.load(out))


def main() -> None:
    from retrain.head import SoftmaxHead

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bottleneck_dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/crossfit_rules"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict[str, dict[str, list]] = {r: {} for r in RULES}
    for folder in args.sets:
        labels, paths, y_all = _images(folder)
        ok, X, keys = _features(paths, args.bottleneck_dir)
        paths, y = [paths[i] for i in ok], np.array(y_all)[ok]
        for seed in args.seeds:
            z = curves(folder.name, seed, X, y, paths, keys, labels, args)
            acc = (z["oof"].argmax(3) == z["yl"]).mean(2)  # (G, S)
            loss = _xent(z["oof"], z["yl"][None, None])
            ens = (z["to_set"][z["test"].mean(2).argmax(3)] == z["yt"]).mean(2)  # fold layers' mean logits
            fitted: dict[tuple[int, int], float] = {}
            for rule, (decays, patience, tol, tie) in RULES.items():
                (g, s), stop = choose(acc, loss, decays, patience, tol, tie)
                if (g, s) not in fitted:
                    head = SoftmaxHead(
                        steps=int(z["marks"][s]), weight_decay=GRID[g], seed=seed, keep_best=False
                    )
                    head.fit(X[z["rows_l"]], z["yl"], n_classes=len(z["to_set"]))
                    fitted[g, s] = float((z["to_set"][head.predict(X[z["test_idx"]])] == z["yt"]).mean())
                cost = int(z["marks"][stop]) * len(decays)
                res[rule].setdefault(folder.name, []).append(
                    (100 * (fitted[g, s] - z["probe"]), 100 * (ens[g, s] - z["probe"]), cost)
                )
    sets = [f.name for f in args.sets]
    for which, title in (
        (0, "final layer fitted on all rows (what the run exports)"),
        (1, "fold layers' mean"),
    ):
        print(f"\n{title}: test accuracy - probe, points, mean [min, max]; steps run x decays\n")
        print("| rule | " + " | ".join(sets) + " | mean | worst set |")
        print("|---|" + "---|" * (len(sets) + 2))
        for rule, per_set in res.items():
            cells, means = [], []
            for name in sets:
                v = np.array([x[which] for x in per_set[name]])
                cost = np.mean([x[2] for x in per_set[name]])
                cells.append(f"{v.mean():+.1f} [{v.min():+.1f}, {v.max():+.1f}], {cost:.0f}")
                means.append(v.mean())
            print(f"| {rule} | " + " | ".join(cells) + f" | {np.mean(means):+.2f} | {min(means):+.1f} |")


if __name__ == "__main__":
    main()
