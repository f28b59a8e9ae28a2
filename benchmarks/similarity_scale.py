"""The audit's similarity pass at scale: the exact pass against the cell pass (retrain.audit).

    python benchmarks/similarity_scale.py [--data /work/data] [--extra FOLDER ...] [--sizes 100000,400000]

1. **Recall, real features**: every cached image of the photo sets of /work/data (and --extra folders),
   the exact pass and the cell pass over the same rows (``exact_max=0`` forces the cells): the share of
   the exact pass's pairs above the near-copy floor, of its final near-copy pairs
   (``find_duplicates``) and of each row's 10 nearest neighbours that the cell pass finds, and the
   label-issue ranking's top 1% overlap.
2. **Time, synthetic features** at --sizes rows (clustered unit vectors, D = 1280, with planted copies):
   the cell pass in full; the exact pass timed on its first blocks and scaled by N / block (its cost is
   the same for every block).
3. With --audit N: the whole audit (``runaudit.audit_run``: similarity pass, label issues, near copies,
   learning curve with solved layers) on N synthetic rows of 20 classes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openworld_methods import SETS, load  # noqa: E402


def recall(exact, cells, n: int) -> dict:
    def codes(nb):
        return set((nb.pair_i * n + nb.pair_j).tolist())

    e, c = codes(exact), codes(cells)
    valid = exact.valid
    overlap = [
        len(set(exact.index[r][valid[r]]) & set(cells.index[r])) / max(valid[r].sum(), 1) for r in range(n)
    ]
    return {
        "pairs_above_floor": len(e),
        "pair_recall": len(e & c) / max(len(e), 1),
        "neighbour_recall": float(np.mean(overlap)),
    }


def real(folders: list[Path], bottleneck_dir: Path) -> None:
    from retrain import audit

    Xs, ys, keys = [], [], []
    for i, f in enumerate(folders):
        X, y, _ = load(f, bottleneck_dir)
        Xs.append(X)
        ys.append(y + 100 * i)
        keys += [f"{f.name}/{j}".encode() for j in range(len(y))]
    X, y = np.concatenate(Xs).astype(np.float32), np.concatenate(ys)
    n, k = len(y), max(audit.LABEL_NEIGHBOURS, audit.NEAR_DUPLICATE_REFERENCE)
    out = {}
    for name, limit in (("exact", n), ("cells", 0)):
        t0 = time.perf_counter()
        out[name] = audit.nearest_neighbours(
            X, k, groups=keys, threshold=audit.NEAR_DUPLICATE_FLOOR, exact_max=limit
        )
        print(f"{name} pass over {n} real images: {time.perf_counter() - t0:.1f} s", flush=True)
    r = recall(out["exact"], out["cells"], n)
    dups = {m: audit.find_duplicates(X, keys, nearest=out[m]) for m in out}
    found = [set(zip(d.i[d.kind == "near"].tolist(), d.j[d.kind == "near"].tolist())) for d in dups.values()]
    print(
        f"pairs above the floor {r['pairs_above_floor']}: {100 * r['pair_recall']:.2f}% found by the cell pass; "
        f"near copies {len(found[0])}: {100 * len(found[0] & found[1]) / max(len(found[0]), 1):.2f}% found "
        f"(and {len(found[1] - found[0])} the exact pass does not report); 10 nearest neighbours: "
        f"{100 * r['neighbour_recall']:.2f}% the same"
    )


def synthetic(n: int, d: int = 1280, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 500), d)).astype(np.float32)
    X = centres[rng.integers(0, len(centres), n)] + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    X[1::97] = X[0:-1:97][: len(X[1::97])] + 0.05 * rng.standard_normal((len(X[1::97]), d)).astype(np.float32)
    return np.abs(X)  # non-negative, as pooled activations are


def timing(n: int) -> None:
    from retrain import audit
    from retrain.audit import _unit_rows

    X = synthetic(n)
    keys = [str(i).encode() for i in range(n)]
    t0 = time.perf_counter()
    nb = audit.nearest_neighbours(X, 10, groups=keys, threshold=audit.NEAR_DUPLICATE_FLOOR, exact_max=0)
    cell_s = time.perf_counter() - t0
    Z = _unit_rows(X, centre=True)
    blocks = 3
    t0 = time.perf_counter()
    for b in range(blocks):
        S = Z[b * 1024 : (b + 1) * 1024] @ Z.T
        audit._top_k(S, 10)
    exact_s = (time.perf_counter() - t0) / blocks * n / 1024
    planted = set(zip(range(0, n - 1, 97), range(1, n, 97)))
    found = len(planted & set(zip(nb.pair_i.tolist(), nb.pair_j.tolist()))) / len(planted)
    print(
        f"{n} rows: cell pass {cell_s:.1f} s ({len(nb.pair_i)} pairs above the floor, {100 * found:.2f}% of "
        f"{len(planted)} planted copies); "
        f"exact pass, estimated from {blocks} blocks: {exact_s:.0f} s ({exact_s / cell_s:.0f}x)",
        flush=True,
    )


def whole_audit(n: int, n_classes: int = 20, solved_c: float = 1.0) -> None:
    """``runaudit.audit_run`` as a default run calls it (L-BFGS layer at ``solved_c``), on ``n`` synthetic rows."""
    import tempfile

    from retrain.runaudit import RunData, audit_run

    X = synthetic(n)
    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, n)
    X += 0.3 * rng.standard_normal((n_classes, X.shape[1])).astype(np.float32)[y]  # a learnable label
    proba = rng.dirichlet(np.ones(n_classes), n)
    split = np.where(rng.random(n) < 0.1, "testing", "training")
    data = RunData(
        image_dir="/nonexistent",
        labels=[f"c{c}" for c in range(n_classes)],
        paths=[f"/nonexistent/c{c}/{i}.jpg" for i, c in enumerate(y)],
        split=list(split),
        y=y,
        keys=[i.to_bytes(20, "big") for i in range(n)],
        X=X,
        proba=proba,
        fold=np.where(split == "testing", -1, np.arange(n) % 5),
        head_params={"steps": 100},
        solved_c=solved_c,
        train_count=int((split == "training").sum()),
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = audit_run(data, Path(tmp))
    print(
        f"whole audit of {n} rows: {time.perf_counter() - t0:.1f} s; parts {summary['seconds']}", flush=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/data"))
    ap.add_argument("--bottleneck_dir", type=Path, default=None)
    ap.add_argument(
        "--extra", type=Path, nargs="*", default=[], help="more folders (cached under --extra_cache)"
    )
    ap.add_argument("--extra_cache", type=Path, default=None)
    ap.add_argument("--sizes", default="100000,400000")
    ap.add_argument(
        "--audit", type=int, default=0, help="also time the whole audit on this many synthetic rows"
    )
    args = ap.parse_args()
    bottleneck_dir = args.bottleneck_dir or args.data / ".cache"
    folders = [args.data / s for s in (*SETS, "unrelated")]
    real(folders, bottleneck_dir)
    if args.extra:
        real(args.extra, args.extra_cache or bottleneck_dir)
    for n in (int(s) for s in args.sizes.split(",") if s):
        timing(n)
    if args.audit:
        whole_audit(args.audit)


if __name__ == "__main__":
    main()
