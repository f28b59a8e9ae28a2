"""Figures for docs/scale.md: the int8 extraction backbone (speed, accuracy cost) and Ray workers (rate, scaling).

    python benchmarks/scale_bench.py int8 [--sets /work/data/gcompris ...]   # speed + accuracy, float32 vs int8
    python benchmarks/scale_bench.py ray [--images 600]                       # needs `pip install 'retrain[ray]'`

int8: the same decoded pixels through the float32 and the int8 ONNX backbone, one ONNX Runtime thread each
(one CPU worker), alternating rounds so machine noise hits both alike; then, per photo set, features at both
precisions and the accuracy of a logistic regression over 5 stratified folds (same folds for both).

ray: a two-node Ray cluster on this machine (two `ray start` processes, 2 logical CPUs each), the photos
extracted with 1 and then 2 CPU actors (a fresh bottleneck folder each time), wall time of the Ray stage
after a warm-up run; and the features compared with the local path's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SETS = [
    "/work/data/cutouts",
    "/work/data/deepsky",
    "/work/data/digits",
    "/work/data/gcompris",
    "/work/data/textures",
]


def _images(folder: str) -> list[str]:
    from retrain.data import discover

    return [r.path for r in discover(folder).records]


def int8_speed(spec, model_dir: str, photos: list[str], rounds: int = 5) -> dict:
    from retrain.engines import OnnxEngine
    from retrain.images import decode_image
    from retrain.precision import backbone_model_path

    size = spec.preprocessing.input_size
    pixels = np.stack([decode_image(Path(p).read_bytes(), size) for p in photos[:64]])
    engines = {p: OnnxEngine(backbone_model_path(spec, p, model_dir), threads=1) for p in ("float32", "int8")}
    times: dict[str, list[float]] = {p: [] for p in engines}
    for e in engines.values():
        e(pixels[:8])  # warm-up
    for _ in range(rounds):
        for p, e in engines.items():
            t0 = time.perf_counter()
            for i in range(0, len(pixels), 8):
                e(pixels[i : i + 8])
            times[p].append(len(pixels) / (time.perf_counter() - t0))
    best = {p: max(v) for p, v in times.items()}
    ratios = [b / a for a, b in zip(times["float32"], times["int8"])]
    return {
        "images_per_s_one_thread": best,
        "int8_speedup_median": float(np.median(ratios)),
        "int8_speedup_range": [float(min(ratios)), float(max(ratios))],
        "rounds": rounds,
    }


def int8_accuracy(spec, model_dir: str, sets: list[str], tmp: str) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from retrain.data import discover
    from retrain.distributed import _local_table

    rows = []
    for folder in sets:
        ds = discover(folder)
        paths = [r.path for r in ds.records]
        y_all = np.array([r.label_index for r in ds.records])
        feats = {}
        for precision in ("float32", "int8"):
            table = _local_table(
                paths, spec, os.path.join(tmp, "bn"), precision=precision, model_dir=model_dir, progress=False
            )
            keep = [i for i, p in enumerate(paths) if p in table.keys]
            feats[precision] = (table.matrix([paths[i] for i in keep]), y_all[keep])
        X32, y = feats["float32"]
        X8, _ = feats["int8"]
        acc = {"float32": [], "int8": []}
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X32, y):
            for precision, X in (("float32", X32), ("int8", X8)):
                clf = LogisticRegression(max_iter=2000, C=1.0).fit(X[train], y[train])
                acc[precision].append(float((clf.predict(X[test]) == y[test]).mean()))
        cos = np.sum(X32 * X8, 1) / (np.linalg.norm(X32, axis=1) * np.linalg.norm(X8, axis=1) + 1e-12)
        rows.append(
            {
                "set": Path(folder).name,
                "images": len(y),
                "float32": float(np.mean(acc["float32"])),
                "int8": float(np.mean(acc["int8"])),
                "fold_differences": [b - a for a, b in zip(acc["float32"], acc["int8"])],
                "feature_cosine_min": float(cos.min()),
                "feature_cosine_mean": float(cos.mean()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ray_scaling(spec, model_dir: str, photos: list[str], tmp: str) -> dict:
    from raycluster import LocalCluster
    from retrain import distributed, shards
    from retrain.distributed import _local_table, extract_on_ray, local_files

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = LocalCluster(nodes=2, cpus_per_node=2).start()
    out: dict = {"images": len(photos)}
    try:
        files = local_files(photos)
        extract_on_ray(
            files[:64],
            spec,
            os.path.join(tmp, "warm"),
            model_dir=model_dir,
            address=cluster.address,
            workers=2,
            chunk_size=32,
            progress=False,
        )  # actors' and Ray Data's first start
        for workers in (1, 2, 1, 2, 1, 2):
            r = extract_on_ray(
                files,
                spec,
                os.path.join(tmp, f"w{workers}-{time.time_ns()}"),
                model_dir=model_dir,
                address=cluster.address,
                workers=workers,
                chunk_size=64,
                progress=False,
            )
            out.setdefault(f"images_per_s_{workers}_workers", []).append(r.images_per_second)
            out.setdefault(f"steady_images_per_s_{workers}_workers", []).append(r.steady_images_per_second)
            last = r
        local = _local_table(photos, spec, os.path.join(tmp, "local"), model_dir=model_dir, progress=False)
        fs, inner = shards.filesystem(last.directory)
        same = total = 0
        for shard in shards.iter_shards(fs, inner, feature_dim=spec.feature_dim):
            for key, row in zip(shard.keys, shard.features):
                if key is not None:
                    total += 1
                    same += bool(np.array_equal(row, local.store.get_many([key])[0]))
        out["bitwise_identical"] = f"{same} of {total}"
        out["local_images_per_s"] = local.computed / local.seconds
        del distributed
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["int8", "ray"])
    p.add_argument("--sets", nargs="*", default=[s for s in SETS if os.path.isdir(s)])
    p.add_argument("--images", type=int, default=600, help="photos for the Ray run (taken from the sets)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    from retrain.backbones import get_backbone
    from retrain.sample_data import sample_image_dir

    spec = get_backbone("efficientnet_lite0")
    tmp = tempfile.mkdtemp(prefix="scale-bench-")
    model_dir = os.environ.get("RETRAIN_MODEL_DIR", os.path.join(tmp, "models"))
    photos = [q for s in (args.sets or [str(sample_image_dir())]) for q in _images(s)]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    if args.what == "int8":
        result = {
            "speed": int8_speed(spec, model_dir, photos),
            "accuracy": int8_accuracy(spec, model_dir, args.sets, tmp),
        }
    else:
        rng = np.random.default_rng(0)
        pick = sorted(rng.choice(len(photos), size=min(args.images, len(photos)), replace=False))
        result = ray_scaling(spec, model_dir, [photos[i] for i in pick], tmp)
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
