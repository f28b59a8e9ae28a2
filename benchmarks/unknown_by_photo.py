"""Known test images called unknown, counted by photo (issue 12).

    python benchmarks/unknown_by_photo.py OUTPUT_DIR [--draws 2000]

OUTPUT_DIR is a run's output folder (its ``output_graph.onnx`` and ``audit.npz``). Run the model on the
run's test images and group them by the photo they come from, as the split does: the part of the file
name before ``_nohash_`` (the tutorial's rule; a file without it is its own photo). When a set holds
several variants of each photo (``benchmarks/benchmark.py`` builds one so), the test images are not
independent, and the share called unknown moves by whole photos: the bootstrap below resamples photos.
Use a run made with ``--final_fit train+val``; with the default ``all`` the exported model has seen
its test images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def photo_of(path: str) -> str:
    name = Path(path).name
    return name.split("_nohash_")[0] if "_nohash_" in name else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    import retrain

    audit = np.load(args.output_dir / "audit.npz", allow_pickle=True)
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in audit["paths"]]
    test = [p for p, s in zip(paths, audit["split"]) if s == "testing"]
    model = retrain.load(args.output_dir / "output_graph.onnx")
    flagged = np.array([bool(r.unknown) for r in model.classify(test)])
    photos = np.array([photo_of(p) for p in test])
    names = sorted(set(photos))
    hits = np.array([flagged[photos == n].sum() for n in names])
    sizes = np.array([(photos == n).sum() for n in names])
    rng = np.random.default_rng(0)
    draws = [hits[i].sum() / sizes[i].sum() for i in rng.integers(0, len(names), (args.draws, len(names)))]
    low, high = np.quantile(draws, [0.025, 0.975])
    print(f"{len(test)} test images from {len(names)} photos; called unknown: {100 * flagged.mean():.1f}%")
    print(f"95% interval, photos resampled: {100 * low:.1f}-{100 * high:.1f}%")
    for n, h, k in zip(names, hits, sizes):
        if h:
            print(f"  {n}: {h} of {k} variants called unknown")


if __name__ == "__main__":
    main()
