#!/usr/bin/env python3
"""What do distortions cost? Plain cached training vs distorted training, per step and per run.

    python benchmarks/distortion_bench.py                  # 2,000 photos, 4,000 steps (about 15 min on 2 cores)
    python benchmarks/distortion_bench.py --quick          # 200 photos, 500 steps, a smoke run
    python benchmarks/distortion_bench.py --image_dir DIR  # your own folder of class sub-folders

Four runs of ``retrain.train`` in this process, on the same photos, same seed, same steps:

1. plain, cold: bottlenecks computed;
2. plain, warm: bottlenecks from the cache (the "plain cached run");
3. distorted, first time (--flip_left_right --random_crop 10 --random_scale 10 --random_brightness 10,
   --distorted_copies automatic): every variant's features computed once;
4. the same distorted command again: every variant from the cache.

Per training step = (time of the new-layer stage + time of the distortion stage) / steps, from each run's
``metrics.json`` timings. For comparison, the cost of retrain.py's way (every image of every step
decoded, distorted and pushed through the network) is measured on a few real steps of 100 images.
Without ``--image_dir`` the photos are built from retrain's bundled sample photos by
``benchmarks/benchmark.py``'s ``build_photo_set`` (crops of 143 real photos, 2 classes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLAGS = dict(flip_left_right=True, random_crop=10, random_scale=10, random_brightness=10)


def run(image_dir: Path, work: Path, name: str, steps: int, **flags) -> dict:
    import retrain

    t0 = time.perf_counter()
    result = retrain.train(
        image_dir,
        bottleneck_dir=str(work / "bn"),
        output_dir=str(work / name),
        model_dir=str(work / "models"),
        how_many_training_steps=steps,
        seed=0,
        quiet=True,
        **flags,
    )
    seconds = dict(result.metrics["seconds"])
    seconds["wall"] = time.perf_counter() - t0
    once = seconds.get("features", 0.0) + seconds.get("distortions", 0.0)
    return {
        "name": name,
        "seconds": seconds,
        "once": once,
        "step_ms": 1000 * seconds["train_head"] / steps,  # the training steps themselves
        "amortised_ms": 1000
        * (once + seconds["train_head"])
        / steps,  # + features/variants spread over the steps
        "test_accuracy": result.test_accuracy,
        "train_count": result.metrics["train_count"],
    }


def online_step_seconds(image_dir: Path, work: Path, batch: int = 100, steps: int = 3) -> float:
    """retrain.py's distortion mode: decode, distort and run the backbone on ``batch`` images per step."""
    from retrain.backbones import get_backbone
    from retrain.data import discover
    from retrain.distort import Distortions, apply, draw
    from retrain.engines import OnnxEngine
    from retrain.export import backbone_onnx_path
    from retrain.images import decode_image, read_image_bytes

    spec = get_backbone("efficientnet_lite0")
    d = Distortions(**FLAGS)
    size = spec.preprocessing.input_size
    engine = OnnxEngine(backbone_onnx_path(spec, work / "models"))
    paths = [r.path for r in discover(image_dir).records]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        pick = rng.choice(len(paths), size=batch)
        pixels = np.stack([decode_image(read_image_bytes(paths[i]), d.source_size(size)) for i in pick])
        engine(apply(pixels, d, draw(d, rng, batch), size))
        times.append(time.perf_counter() - t0)
    return min(times)


def table(rows: list[dict], steps: int, online_s: float) -> str:
    plain = next(r for r in rows if r["name"] == "plain-warm")
    lines = [
        "| run | features / variants (s) | new layer (s) | per step (ms) | x plain cached | "
        "per step incl. features (ms) | x plain cached | test accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['once']:.1f} | {r['seconds']['train_head']:.1f} | {r['step_ms']:.2f} | "
            f"{r['step_ms'] / plain['step_ms']:.2f} | {r['amortised_ms']:.2f} | "
            f"{r['amortised_ms'] / plain['amortised_ms']:.2f} | {100 * (r['test_accuracy'] or 0):.1f}% |"
        )
    ms = 1000 * online_s
    lines.append(
        f"| retrain.py-style (decode + distort + network per step; {steps} steps = {online_s * steps / 3600:.1f} h) "
        f"| - | - | {ms:.0f} | {ms / plain['step_ms']:.0f} | {ms:.0f} | {ms / plain['amortised_ms']:.0f} | - |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--image_dir", help="folder of class sub-folders (default: 2,000 crops of the sample photos)"
    )
    p.add_argument("--n_images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--copies", type=int, default=0, help="--distorted_copies (0 = automatic)")
    p.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    p.add_argument("--quick", action="store_true", help="200 photos, 500 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.steps = 200, 500
    work = Path(args.work or tempfile.mkdtemp(prefix="retrain-distortion-bench-"))
    try:
        if args.image_dir:
            image_dir = Path(args.image_dir)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchmark import build_photo_set

            image_dir = build_photo_set(work / "photos", args.n_images)
        from retrain.backbones import get_backbone
        from retrain.export import backbone_onnx_path

        backbone_onnx_path(
            get_backbone("efficientnet_lite0"), work / "models"
        )  # export once, outside the timings
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows = [
            run(image_dir, work, "plain-cold", args.steps),
            run(image_dir, work, "plain-warm", args.steps),
            run(image_dir, work, "distorted-first", args.steps, distorted_copies=args.copies, **FLAGS),
            run(image_dir, work, "distorted-cached", args.steps, distorted_copies=args.copies, **FLAGS),
        ]
        online = online_step_seconds(image_dir, work)
        print(
            f"\n{rows[0]['train_count']} training images, {args.steps} steps of 100; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
            f"at the start\n"
        )
        print(table(rows, args.steps, online))
        cached = rows[3]["amortised_ms"] / rows[1]["amortised_ms"]
        print(
            f"\nbar: distorted training (variants cached) per step <= 3x a plain cached run: {cached:.2f}x -> "
            f"{'met' if cached <= 3 else 'NOT met'}"
        )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
