"""What the default run's final layer could do better, measured on cached features of real photo sets.

    python benchmarks/accuracy_options.py SET [SET ...] [--seeds 0 1 2 3 4 5 6 7] --bottleneck_dir CACHE
                                          [--work DIR] [--json FILE]

The same outer split as ``benchmarks/accuracy.py`` (a disjoint ``--test_fraction`` of each set, by a hash of the
seed and the image's group); the training folder is then split as ``retrain`` splits it (its own 10% test and
10% validation, by retrain.py's file-name hash), and every option below is fitted on its training + validation
rows and scored on the disjoint outer test set, beside ``LogisticRegressionCV`` on 100% of the training folder:

* ``default``: the run's cross-fit (5 folds, weight decay 0) chooses the steps; the layer is fitted on all rows;
* ``wd(GRID)``: the cross-fit also chooses the weight decay from GRID (by out-of-fold accuracy, then loss);
* ``wd-loss``: the same, but (weight decay, steps) chosen by out-of-fold cross entropy alone;
* ``folds``: no final fit; the average probability of the cross-fit's fold layers at the chosen point;
* ``flip``: every image's feature vector averaged with that of its mirror image, for training and testing;
* ``std``: features standardised by the training rows' mean and spread (a linear map the layer can absorb).

All fold fits of one set and seed run in one batched loop (``fit_and_score_many`` with ``weight_decays``); an
option on a smaller grid reads its subset of those fits (every layer is independent of the others), with the
run's early stop emulated on that subset. Mirrored-image features are computed once and kept in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import _features, _images, _link_training_folder, _outer_split  # noqa: E402

GRID = (0.0, 1e-4, 1e-3, 1e-2, 3e-2)
PATIENCE = 6  # retrain.crossfit.PATIENCE


def _flipped(paths: list[str], keys: list[bytes], store: Path) -> np.ndarray:
    """Features of the mirrored images (N, D), computed once per content key and kept in ``store``."""
    from retrain.backbones import get_backbone
    from retrain.engines import make_engine
    from retrain.images import decode_image, read_image_bytes

    have: dict[str, np.ndarray] = {}
    if store.exists():
        with np.load(store) as z:
            have = dict(zip(z["keys"], z["X"]))
    todo = [i for i, k in enumerate(keys) if k.hex() not in have]
    if todo:
        spec = get_backbone("efficientnet_lite0")
        engine = make_engine(spec, device="cpu")
        size, resample = spec.preprocessing.input_size, spec.preprocessing.resample
        for s in range(0, len(todo), 16):
            chunk = todo[s : s + 16]
            px = np.stack([decode_image(read_image_bytes(paths[i]), size, resample=resample) for i in chunk])
            for i, v in zip(chunk, engine(np.ascontiguousarray(px[:, :, ::-1]))):
                have[keys[i].hex()] = v
        np.savez(store, keys=np.array(list(have)), X=np.stack(list(have.values())))
    return np.stack([have[k.hex()] for k in keys])


def _internal_split(folder: Path, bottlenecks: Path):
    """retrain's own split of the training folder: (training + validation rows, their groups, keys)."""
    from retrain import extract_features
    from retrain.data import discover
    from retrain.fit import labelled_groups
    from retrain.splits import split_features

    ds = discover(folder)
    splits = split_features(ds, extract_features(ds, bottleneck_dir=bottlenecks))
    labelled = splits.train + splits.validation
    return labelled, labelled_groups(labelled.keys, labelled.paths), splits.labels


def _probe(X, y):
    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegressionCV(Cs=list(np.logspace(-3, 2, 11)), cv=5, max_iter=3000).fit(X, y)


def _xent(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())


def _cross_fit_grid(X, y, Xt, groups, n_classes, seed, grid):
    """Out-of-fold logits (G, S, N, C) and the fold layers' logits on the test rows (G, S, K, Nt, C)."""
    from retrain.crossfit import DEFAULT_FOLDS, assign_folds, fit_and_score_many

    n = len(y)
    fold = assign_folds(y, DEFAULT_FOLDS, groups=groups, seed=seed)
    k = int(fold.max()) + 1
    XA = np.concatenate([X, Xt])
    test_rows = np.arange(n, n + len(Xt))
    jobs = [
        (
            np.flatnonzero(fold != f),
            np.concatenate([np.flatnonzero(fold == f), test_rows]),
            seed + 1000 * (f + 1),
        )
        for f in range(k)
    ]
    best = [((-1.0, 0.0), 0)] * len(grid)  # per decay: (score, checkpoint)

    def stop(outputs, i):
        # Once every decay's own best is `patience` checkpoints old, every grid subset's early stop has come.
        for g in range(len(grid)):
            z = np.empty((n, n_classes), np.float32)
            for f, (_, score_idx, _) in enumerate(jobs):
                z[score_idx[: len(score_idx) - len(Xt)]] = outputs[g * k + f][i, : len(score_idx) - len(Xt)]
            score = (float((z.argmax(axis=1) == y).mean()), -_xent(z, y))
            if score > best[g][0]:
                best[g] = (score, i)
        return all(i - b >= PATIENCE for _, b in best)

    marks, outs = fit_and_score_many(
        XA, np.concatenate([y, np.zeros(len(Xt), np.int64)]), jobs, n_classes=n_classes,
        head_params={"steps": 4000}, weight_decays=grid, stop=stop,
    )  # fmt: skip
    G, S = len(grid), len(marks)
    oof = np.empty((G, S, n, n_classes), np.float32)
    test = np.empty((G, S, k, len(Xt), n_classes), np.float32)
    for g in range(G):
        for f, (_, score_idx, _) in enumerate(jobs):
            out = outs[g * k + f]
            held = len(score_idx) - len(Xt)
            oof[g][:, score_idx[:held]] = out[:, :held]
            test[g, :, f] = out[:, held:]
    return marks, oof, test


def _choose(marks, oof, y, grid_idx, by="accuracy", patience=PATIENCE):
    """(g, s) the run would choose on the grid subset ``grid_idx``, early stop emulated as in cross_fit."""
    acc = (oof.argmax(axis=3) == y).mean(axis=2)  # (G, S)
    loss = np.array([[_xent(oof[g, s], y) for s in range(oof.shape[1])] for g in range(oof.shape[0])])
    best, best_score = None, None
    for s in range(len(marks)):
        for g in grid_idx:
            score = (acc[g, s], -loss[g, s]) if by == "accuracy" else (-loss[g, s],)
            if best_score is None or score > best_score:
                best, best_score = (g, s), score
        if s - best[1] >= patience:
            break
    return best


def _final(X, y, n_classes, steps, wd, seed):
    from retrain.head import SoftmaxHead

    return SoftmaxHead(steps=steps, weight_decay=wd, seed=seed, keep_best=False).fit(
        X, y, n_classes=n_classes
    )


def run(folder: Path, args) -> list[dict]:
    labels, paths, y_all = _images(folder)
    y_all = np.array(y_all)
    ok, X, keys = _features(paths, args.bottleneck_dir)
    paths, y = [paths[i] for i in ok], y_all[ok]
    key_row = {k: i for i, k in enumerate(keys)}
    XF = _flipped([str(p) for p in paths], keys, args.work / f"flip-{folder.name}.npz")
    grid = list(GRID)
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        test = _outer_split(paths, keys, y, args.test_fraction, seed)
        tr = np.flatnonzero(~test)
        probe_file = args.work / f"probe-{folder.name}-{seed}.json"
        if probe_file.exists():
            probe = json.loads(probe_file.read_text())
        else:
            lr = _probe(X[tr], y[tr])
            probe = {"acc": float((lr.predict(X[test]) == y[test]).mean()), "C": float(np.ravel(lr.C_)[0])}
            probe_file.write_text(json.dumps(probe))
        train_dir = args.work / f"split-{folder.name}-{seed}"
        if not train_dir.exists():
            _link_training_folder(train_dir, [paths[i] for i in tr], labels, y[tr])
        labelled, groups, run_labels = _internal_split(train_dir, args.bottleneck_dir)
        to_set = np.array([labels.index(label) for label in run_labels])
        rows_l = np.array([key_row[k] for k in labelled.keys])
        yl, yt = labelled.y, y[test]
        C = len(run_labels)
        row = {"set": folder.name, "seed": seed, "probe": probe["acc"], "probe_C": probe["C"], "n": len(yl)}

        def score(logits, to_set=to_set, yt=yt):
            return float((to_set[logits.argmax(axis=1)] == yt).mean())

        feats = {
            "plain": (X[rows_l], X[test]),
            "flip": ((X[rows_l] + XF[rows_l]) / 2, (X[test] + XF[test]) / 2),
        }
        mu, sd = X[rows_l].mean(axis=0), X[rows_l].std(axis=0) + 1e-6
        feats["std"] = ((X[rows_l] - mu) / sd, (X[test] - mu) / sd)
        for fname, (Xl, Xt) in feats.items():
            marks, oof, test_logits = _cross_fit_grid(Xl, yl, Xt, groups, C, seed, grid)
            options = {"default": ([0], "accuracy"), "wd": (list(range(len(grid) - 1)), "accuracy")}
            options["wd+3e-2"] = (list(range(len(grid))), "accuracy")
            options["wd-loss"] = (list(range(len(grid) - 1)), "loss")
            for oname, (gi, by) in options.items():
                if fname != "plain" and oname not in ("default", "wd"):
                    continue
                g, s = _choose(marks, oof, yl, gi, by)
                name = oname if fname == "plain" else f"{fname}+{oname}"
                head = _final(Xl, yl, C, int(marks[s]), grid[g], seed)
                row[name] = score(Xt @ head.coef_ + head.intercept_)
                row[f"{name}_wd"], row[f"{name}_steps"] = grid[g], int(marks[s])
                row[f"{name}_oof"] = float((oof[g, s].argmax(axis=1) == yl).mean())
                if oname in ("default", "wd"):
                    z = test_logits[g, s] - test_logits[g, s].max(axis=2, keepdims=True)
                    p = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
                    row[f"{name}+folds"] = score(p.mean(axis=0))
        row["seconds"] = time.perf_counter() - t0
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    sets = list(dict.fromkeys(r["set"] for r in rows))
    options = [k for k in rows[0] if k not in ("set", "seed", "n", "seconds", "probe_C") and "_" not in k]
    lines = ["| option | " + " | ".join(sets) + " | mean | worst set |", "|---|" + "---|" * (len(sets) + 2)]
    for o in options:
        diffs = []
        cells = []
        for s in sets:
            d = 100 * np.array([r[o] - r["probe"] for r in rows if r["set"] == s])
            diffs.append(d.mean())
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
            cells.append(f"{d.mean():+.1f} ± {se:.1f}")
        lines.append(f"| {o} | " + " | ".join(cells) + f" | {np.mean(diffs):+.2f} | {min(diffs):+.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--test_fraction", type=float, default=0.2)
    ap.add_argument("--bottleneck_dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/accuracy_options"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [r for s in args.sets for r in run(s, args)]
    print(
        "Test accuracy minus LogisticRegressionCV (100% of the training folder), points; mean ± standard error"
    )
    print(f"over split seeds {', '.join(map(str, args.seeds))}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
