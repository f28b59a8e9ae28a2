"""Which unknown score? Every candidate on every set, every class held out in turn (issue 12).

    PYTHONPATH=src python benchmarks/openworld_methods.py [--data /work/data] [--steps 1000] [--folds 3]

For each set of /work/data and each of its classes c: the other classes' images are split into --folds
stratified folds; per fold, a layer (SoftmaxHead settings, --steps steps; all layers of a set in one
batched loop) and the feature statistics are fitted on the other folds; known = the fold's images,
unknown = every image of c (and, separately, /work/data/unrelated). AUROC per (set, class, fold), then
averaged: per set over its classes, "named" over the held-out class of docs/datasets.md only.
Features are the cached efficientnet_lite0 ones (--bottleneck_dir, default /work/data/.cache), L2-normalised.

Scores: max-softmax, energy (-logsumexp), Mahalanobis to the nearest class mean (shared Ledoit-Wolf
covariance: the exported one), kNN cosine distance (k = 1..20; also after PCA to 64/128 dims), the
ViM-style residual off the top principal directions, and sums of two scores each put on the scale of
the known images (0 at their median, 1 at their 95th percentile).
"""

from __future__ import annotations

import argparse
import json
import sys
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
PAIRS = [
    ("maha", "energy"),
    ("knn1", "energy"),
    ("knn5", "energy"),
    ("knn10", "energy"),
    ("knn5", "maha"),
    ("knn5", "msp"),
    ("vimres64", "energy"),
]


def load(folder: Path, bottleneck_dir: Path):
    import retrain
    from retrain.data import discover

    ds = discover(folder)
    paths = [r.path for r in ds.records]
    X = retrain.extract_features(paths, bottleneck_dir=bottleneck_dir).matrix(paths)
    return X, np.array([r.label_index for r in ds.records]), list(ds.labels)


def maha(Xf, yf, Q, C):
    from retrain.openset import _shrunk_cov

    mu = np.stack([Xf[yf == c].mean(0) for c in range(C)])
    R = Xf - mu[yf]
    S, _ = _shrunk_cov(R.T @ R, (R * R).sum(1), len(R))  # as measured; the exported statistics use len(R) - C
    Wt = np.linalg.inv(np.linalg.cholesky(S.astype(np.float64))).T
    Z, M = Q @ Wt, mu @ Wt
    return ((Z * Z).sum(1)[:, None] - 2 * Z @ M.T + (M * M).sum(1)).min(1)


def pca(Xf, k):
    m = Xf.mean(0)
    return m, np.linalg.svd(Xf - m, full_matrices=False)[2][:k]


def knn_pca(Xf, Q, k, dims):
    from retrain.openset import normalize

    m, V = pca(Xf, dims)
    return -np.sort(normalize((Q - m) @ V.T) @ normalize((Xf - m) @ V.T).T, 1)[:, -k:].mean(1)


def vim_residual(Xf, Q, k):
    m, V = pca(Xf, k)
    Z = Q - m
    return np.linalg.norm(Z - (Z @ V.T) @ V, axis=1)


def scaled(known, *others):
    mid = np.median(known)
    spread = max(np.quantile(known, 0.95) - mid, 1e-9)
    return [(v - mid) / spread for v in (known, *others)]


def one_set(name, data, bottleneck_dir, U, steps, folds):
    from retrain.crossfit import assign_folds, fit_and_score_many
    from retrain.openset import auroc, energy, normalize

    X, y, labels = load(data / name, bottleneck_dir)
    X = normalize(X)
    C = len(labels)
    Xall = np.concatenate([X, U]).astype(np.float32)
    yall = np.concatenate([y, np.zeros(len(U), np.int64)])
    u_rows = np.arange(len(X), len(Xall))
    jobs, meta = [], []
    for c in range(C):
        kn = np.flatnonzero(y != c)
        fold = assign_folds(y[kn], folds, seed=0)
        for f in range(folds):
            fit, tst = kn[fold != f], kn[fold == f]
            jobs.append((fit, np.concatenate([tst, np.flatnonzero(y == c), u_rows]), 1 + len(jobs)))
            meta.append((c, fit, tst))
    t0 = time.time()
    _, scored = fit_and_score_many(Xall, yall, jobs, n_classes=C, head_params=dict(steps=steps))
    print(f"{name}: {len(jobs)} layers in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for (c, fit, tst), logits in zip(meta, scored):
        z = np.delete(logits[-1], c, axis=1).astype(np.float64)  # c was never a target
        nk, nu = len(tst), int((y == c).sum())
        others = [k for k in range(C) if k != c]
        yf, Xf = np.searchsorted(others, y[fit]), X[fit]
        Q = np.concatenate([X[tst], X[y == c], U])
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        S = {"msp": 1 - p.max(1), "energy": energy(z), "maha": maha(Xf, yf, Q, C - 1)}
        srt = np.sort(Q @ Xf.T, 1)
        for k in (1, 3, 5, 10, 20):
            S[f"knn{k}"] = -srt[:, -k:].mean(1)
        for dims in (64, 128):
            S[f"knnpca{dims}_5"] = knn_pca(Xf, Q, 5, dims)
        for k in (64, 256):
            S[f"vimres{k}"] = vim_residual(Xf, Q, k)
        for a, b in PAIRS:
            S[f"{a}+{b}"] = scaled(S[a][:nk], S[a])[1] + scaled(S[b][:nk], S[b])[1]
        for m, s in S.items():
            k_, u_, o_ = s[:nk], s[nk : nk + nu], s[nk + nu :]
            rows.append(
                dict(set=name, held=labels[c], named=labels[c] == SETS[name], method=m,
                     held_out=auroc(k_, u_), unrelated=auroc(k_, o_))
            )  # fmt: skip
    return rows


def print_table(rows: list[dict], sets: list[str]) -> None:
    """AUROC per score: per set (mean over its held-out classes), over every class, the named class, and
    vs unrelated pictures (blank for a score without one)."""
    print(f"| score | {' | '.join(sets)} | mean (all classes) | mean (named class) | mean vs unrelated |")
    print("|---|" + "---|" * (len(sets) + 3))
    for m in dict.fromkeys(r["method"] for r in rows):
        rr = [r for r in rows if r["method"] == m]
        per = [np.mean([r["held_out"] for r in rr if r["set"] == s]) for s in sets]
        named = np.mean([r["held_out"] for r in rr if r["named"]])
        ood = np.mean([np.mean([r["unrelated"] for r in rr if r["set"] == s]) for s in sets])
        cells = " | ".join(f"{100 * v:.1f}" for v in per)
        unrelated = "" if np.isnan(ood) else f"{100 * ood:.1f}"
        print(f"| {m} | {cells} | {100 * np.mean(per):.1f} | {100 * named:.1f} | {unrelated} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/data"))
    ap.add_argument("--bottleneck_dir", type=Path, default=None)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from retrain.openset import normalize

    bottleneck_dir = args.bottleneck_dir or args.data / ".cache"
    U = normalize(load(args.data / "unrelated", bottleneck_dir)[0])
    sets = args.sets.split(",")
    rows = [r for name in sets for r in one_set(name, args.data, bottleneck_dir, U, args.steps, args.folds)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows, sets)


if __name__ == "__main__":
    main()
