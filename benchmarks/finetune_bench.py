#!/usr/bin/env python3
"""Does --fine_tune help where frozen ImageNet features are weak? Frozen head vs fine-tuned, same photos.

    python benchmarks/finetune_bench.py             # ~1,600 images, top 6 blocks, up to 8 epochs (CPU: ~30 min)
    python benchmarks/finetune_bench.py --quick     # ~300 images, top 3 blocks, 2 epochs (CPU: ~3 min)
    python benchmarks/finetune_bench.py --image_dir DIR --blocks 3   # your own folder of class sub-folders

The task ("scratch detection") is built from real photos, far from ImageNet's: grayscale square crops
(30-50% of the short side, resized to 224 px) of the 143 photos bundled with retrain, a random half of
them with a synthetic scratch drawn in: a straight line 40-90 px long, 2-3 px wide, at a random angle
and place, 35-60 grey levels brighter or darker than the surface. Two classes, ``good`` and
``scratch``. Crops of one photo are named ``<photo>_nohash_<n>.jpg``, so they all fall into the same
split: test accuracy is measured on photos never seen in training. The photos are real; the defects
are not. It stands in for MVTec-style surface inspection, where the defect is small and the global
average of ImageNet features barely changes with it.

Two runs of ``retrain.train`` with the same seed and split: the frozen-feature head (retrain's
default) and the same plus ``--fine_tune``. Prints a table of validation and test accuracy and time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_VERSION = 1


def make_scratch_set(out_dir: Path, crops_per_photo: int = 12, *, seed: int = 0, size: int = 224) -> Path:
    """Grayscale crops of the bundled sample photos, half of them with a drawn-in scratch (see module doc)."""
    from PIL import Image, ImageDraw

    from retrain.sample_data import sample_image_dir

    recipe = {"version": DATASET_VERSION, "crops": crops_per_photo, "seed": seed, "size": size}
    marker = out_dir / ".finetune-bench.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    for label in ("good", "scratch"):
        (out_dir / label).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for photo in sorted(sample_image_dir().rglob("*.jpg")):
        img = Image.open(photo).convert("L")
        w, h = img.size
        for i in range(crops_per_photo):
            s = int(min(w, h) * rng.uniform(0.3, 0.5))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            crop = img.crop((x, y, x + s, y + s)).resize((size, size), Image.Resampling.LANCZOS)
            if np.asarray(crop).std() < 12:  # blank studio background: nothing to inspect
                continue
            scratch = rng.random() < 0.5
            if scratch:
                mask = Image.new("L", (size, size), 0)
                length, angle = rng.uniform(40, 90), rng.uniform(0, np.pi)
                cx, cy = rng.uniform(40, size - 40, 2)
                dx, dy = length / 2 * np.cos(angle), length / 2 * np.sin(angle)
                ImageDraw.Draw(mask).line(
                    [(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(2, 4))
                )
                delta = rng.choice([-1.0, 1.0]) * rng.uniform(35, 60)
                pixels = np.asarray(crop, np.float32) + np.asarray(mask, np.float32) / 255 * delta
                crop = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            label = "scratch" if scratch else "good"
            crop.save(out_dir / label / f"{photo.parent.name}_{photo.stem}_nohash_{i}.jpg", quality=92)
    marker.write_text(json.dumps(recipe))
    return out_dir


def run(image_dir: Path, work: Path, name: str, **flags) -> dict:
    import retrain

    t0 = time.perf_counter()
    result = retrain.train(
        image_dir,
        bottleneck_dir=str(work / "bn"),
        model_dir=str(work / "models"),
        output_dir=str(work / name),
        seed=0,
        quiet=True,
        validation_percentage=15,
        testing_percentage=20,
        **flags,
    )
    report_path = work / name / "fine_tune.json"
    return {
        "name": name,
        "validation_accuracy": result.validation_accuracy,
        "test_accuracy": result.test_accuracy,
        "test_count": result.test_count,
        "train_count": result.metrics["train_count"],
        "seconds": time.perf_counter() - t0,
        "fine_tune_seconds": result.metrics["seconds"].get("fine_tune"),
        "report": json.loads(report_path.read_text()) if report_path.exists() else None,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | validation accuracy | test accuracy (N) | fine-tuning epochs (best) | time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        rep = r["report"]
        epochs = f"{rep['epochs_run']} ({rep['best_epoch']})" if rep else "-"
        lines.append(
            f"| {r['name']} | {100 * (r['validation_accuracy'] or 0):.1f}% | "
            f"{100 * (r['test_accuracy'] or 0):.1f}% ({r['test_count']}) | {epochs} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_dir", help="your own folder of class sub-folders (default: the scratch task)")
    p.add_argument("--crops_per_photo", type=int, default=12)
    p.add_argument("--blocks", default="6", help="--fine_tune_blocks")
    p.add_argument("--epochs", type=int, default=8, help="--fine_tune_epochs")
    p.add_argument("--patience", type=int, default=3, help="--fine_tune_patience")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="--fine_tune_learning_rate")
    p.add_argument(
        "--distort",
        action="store_true",
        help="fine-tune with --flip_left_right --random_crop 10 --random_scale 10 as well",
    )
    p.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    p.add_argument("--quick", action="store_true", help="2 crops per photo, top 3 blocks, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.crops_per_photo, args.blocks, args.epochs = 2, "3", 2
    work = Path(args.work or tempfile.mkdtemp(prefix="retrain-finetune-bench-"))
    extra = dict(flip_left_right=True, random_crop=10, random_scale=10) if args.distort else {}
    try:
        image_dir = (
            Path(args.image_dir)
            if args.image_dir
            else make_scratch_set(work / "scratch", args.crops_per_photo)
        )
        n = sum(1 for _ in image_dir.rglob("*.jpg"))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows = [run(image_dir, work, "frozen backbone + new layer")]
        if extra:
            rows.append(run(image_dir, work, "frozen backbone + new layer, distortions", **extra))
        name = f"fine-tuned (top {args.blocks} blocks{', distortions' if args.distort else ''})"
        rows.append(
            run(
                image_dir,
                work,
                name,
                fine_tune=True,
                fine_tune_blocks=args.blocks,
                fine_tune_epochs=args.epochs,
                fine_tune_patience=args.patience,
                fine_tune_learning_rate=args.learning_rate,
                **extra,
            )
        )
        print(
            f"\n{n} images ({rows[0]['train_count']} training), efficientnet_lite0, "
            f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start; "
            f"fine-tuning took {rows[-1]['fine_tune_seconds']:.0f} s\n"
        )
        print(table(rows))
        rep = rows[-1]["report"]
        if rep:
            print(
                "\nfine-tuning, validation accuracy per epoch: "
                + ", ".join(f"{h['epoch']}: {100 * h['validation_accuracy']:.1f}%" for h in rep["history"])
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
