"""How far is the unknown score from what these features allow? (issue 12)

    python benchmarks/openworld_ceiling.py [--data /work/data] [--folds 3] [--json rows.json]

For each photo set and each class c held out in turn, the other classes' images are dealt into --folds
stratified folds; per fold, the final layer is fitted on the other folds as a default run fits it (the
L-BFGS layer on the raw cached features, its C chosen by ``crossfit.cross_fit_l2``), the Mahalanobis
statistics as the run fits them (``openset.fit_stats``), and known = the fold's images, unknown = every
image of c (and, separately, /work/data/unrelated). Scores:

- the shipped ones: max-softmax, energy, Mahalanobis, and their exported sum (each term 0 at the known
  images' median, 1 at their 95th percentile);
- variants measured against it: the Mahalanobis term on square-rooted features (a power normalisation
  of non-negative pooled activations), and the energy of a weaker layer (10x and 100x the chosen C);
- **supervised reference**: a binary logistic layer trained to tell c from the other classes *with* c's
  images (cross-validated over the same number of folds of all the set's images, the best of three C),
  i.e. roughly how well these features separate c when its photos are labelled. An unknown score never
  sees c, so this is an upper reference for it, not a method.

AUROC per (set, class, fold), averaged per set over its classes; "named" = only the held-out class of
docs/datasets.md. Features: the cached efficientnet_lite0 ones (--bottleneck_dir, default
/work/data/.cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openworld_methods import SETS, load, print_table, scaled  # noqa: E402

WEAKER = (10.0, 100.0)  # multiples of the chosen C for the weaker layers' energy


def layer_logits(X_fit, y_fit, Q, n_classes, c, init=None):
    from retrain.logreg import fit_logistic, strength

    W, b, _ = fit_logistic(X_fit, y_fit, n_classes=n_classes, l2=strength(c, len(y_fit)), init=init)
    return Q @ W + b, (W, b)


def shipped_scores(X0, y_fit_rows, yf, q_rows, U0, n_known_classes):
    """Scores of one (class, fold) job: X0 raw features, ``y_fit_rows`` the fitted rows, ``q_rows`` the
    scored rows of X0 (known fold, then the held-out class), then the unrelated rows U0."""
    from retrain.crossfit import cross_fit_l2
    from retrain.openset import energy, fit_stats, normalize

    Xf = X0[y_fit_rows]
    Q = np.concatenate([X0[q_rows], U0]).astype(np.float32)
    c = cross_fit_l2(Xf, yf, n_classes=n_known_classes).c
    z, init = layer_logits(Xf, yf, Q, n_known_classes, c)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    S = {
        "max-softmax": 1 - p.max(1),
        "energy": energy(z),
        "Mahalanobis": fit_stats(normalize(Xf), yf, n_known_classes).score(Q),
    }
    root = np.sqrt(np.maximum(Xf, 0))
    S["Mahalanobis, sqrt features"] = fit_stats(normalize(root), yf, n_known_classes).score(
        np.sqrt(np.maximum(Q, 0))
    )
    for m in WEAKER:
        z, init = layer_logits(Xf, yf, Q, n_known_classes, c * m, init)
        S[f"energy at {m:g}x C"] = energy(z)
    return S, c


def combine(S, nk):
    def sum_of(a, b):
        return scaled(S[a][:nk], S[a])[1] + scaled(S[b][:nk], S[b])[1]

    out = {"Mahalanobis + energy (exported)": sum_of("Mahalanobis", "energy")}
    out["Mahalanobis on sqrt features + energy"] = sum_of("Mahalanobis, sqrt features", "energy")
    for m in WEAKER:
        out[f"Mahalanobis + energy at {m:g}x C"] = sum_of("Mahalanobis", f"energy at {m:g}x C")
    return out


def supervised(X0, y, c, folds):
    """Cross-validated AUROC of a binary layer trained on c's images against the other classes'."""
    from retrain.crossfit import assign_folds
    from retrain.openset import auroc, normalize

    X = normalize(X0).astype(np.float32)
    b = (y == c).astype(np.int64)
    fold = assign_folds(b, folds, seed=0)
    best = 0.0
    for strength_c in (0.1, 1.0, 10.0):
        s = np.zeros(len(y))
        for f in range(folds):
            train = fold != f
            z, _ = layer_logits(X[train], b[train], X[~train], 2, strength_c)
            s[~train] = z[:, 1] - z[:, 0]
        best = max(best, auroc(s[b == 0], s[b == 1]))
    return best


def one_set(name, data, bottleneck_dir, U0, folds):
    from retrain.crossfit import assign_folds
    from retrain.openset import auroc

    X0, y, labels = load(data / name, bottleneck_dir)
    X0 = X0.astype(np.float32)
    n = len(labels)
    rows, t0 = [], time.time()
    for c in range(n):
        known = np.flatnonzero(y != c)
        others = [k for k in range(n) if k != c]
        fold = assign_folds(y[known], folds, seed=0)
        for f in range(folds):
            fit, test = known[fold != f], known[fold == f]
            q_rows = np.concatenate([test, np.flatnonzero(y == c)])
            S, chosen = shipped_scores(X0, fit, np.searchsorted(others, y[fit]), q_rows, U0, n - 1)
            nk, nu = len(test), int((y == c).sum())
            S.update(combine(S, nk))
            for method, s in S.items():
                rows.append(
                    dict(set=name, held=labels[c], named=labels[c] == SETS[name], method=method, C=chosen,
                         held_out=auroc(s[:nk], s[nk : nk + nu]), unrelated=auroc(s[:nk], s[nk + nu :]))
                )  # fmt: skip
        ref = supervised(X0, y, c, folds)
        rows.append(
            dict(set=name, held=labels[c], named=labels[c] == SETS[name],
                 method="supervised reference (sees the class)", held_out=ref, unrelated=float("nan"))
        )  # fmt: skip
    print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/data"))
    ap.add_argument("--bottleneck_dir", type=Path, default=None)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bottleneck_dir = args.bottleneck_dir or args.data / ".cache"
    U0 = load(args.data / "unrelated", bottleneck_dir)[0].astype(np.float32)
    sets = args.sets.split(",")
    rows = [r for name in sets for r in one_set(name, args.data, bottleneck_dir, U0, args.folds)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows, sets)


if __name__ == "__main__":
    main()
