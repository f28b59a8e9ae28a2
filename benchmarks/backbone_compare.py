"""Two backbones side by side: extraction time per image and retrain's test accuracy on real photo sets.

    python benchmarks/backbone_compare.py SET [SET ...] [--backbones mobilenet_v2 efficientnet_lite0]
                                          [--seeds 0 1 2] [--bottleneck_dir DIR] [--json FILE]

* Speed: the backbones' ONNX feature graphs (what ``retrain`` extracts with) run on the same 64 decoded
  photos of the first set, batch 32, in alternating rounds in one process, so machine load hits both alike;
  the median round gives ms/image, and the ratio is the figure to read on a shared machine.
* Accuracy: ``retrain.train`` with default flags on every set, once per backbone and seed. The test split
  depends on the file names and the seed only, so both backbones are scored on the same test photos.

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def speed(backbones: list[str], folder: Path, rounds: int = 7) -> dict[str, float]:
    """Median ms/image of each backbone's ONNX feature graph on 64 photos of ``folder``, alternating rounds."""
    import numpy as np

    from retrain.backbones import get_backbone
    from retrain.data import discover
    from retrain.engines import OnnxEngine
    from retrain.export import backbone_onnx_bytes
    from retrain.images import load_image

    paths = [r.path for r in discover(folder).records][:64]
    engines, pixels = {}, {}
    for name in backbones:
        spec = get_backbone(name)
        engines[name] = OnnxEngine(backbone_onnx_bytes(spec))
        size = spec.preprocessing.input_size
        pixels[name] = np.stack([load_image(p, size) for p in paths])
        engines[name](pixels[name][:32])  # warm-up
    times: dict[str, list[float]] = {n: [] for n in backbones}
    for _ in range(rounds):
        for name in backbones:
            t0 = time.perf_counter()
            for i in range(0, len(paths), 32):
                engines[name](pixels[name][i : i + 32])
            times[name].append(1000 * (time.perf_counter() - t0) / len(paths))
    return {n: statistics.median(t) for n, t in times.items()}


def accuracy(backbones: list[str], sets: list[Path], seeds: list[int], cache: str) -> dict:
    import retrain

    out: dict = {}
    for folder in sets:
        for name in backbones:
            for seed in seeds:
                with tempfile.TemporaryDirectory() as run:
                    t0 = time.perf_counter()
                    result = retrain.train(
                        folder, architecture=name, bottleneck_dir=cache, output_dir=run, seed=seed, quiet=True
                    )
                out.setdefault(folder.name, {}).setdefault(name, []).append(
                    {
                        "seed": seed,
                        "test_accuracy": result.test_accuracy,
                        "test_count": result.test_count,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(
                    f"{folder.name} {name} seed {seed}: {result.test_accuracy:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sets", nargs="+", type=Path)
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--bottleneck_dir", default=os.path.join(tempfile.gettempdir(), "backbone_compare_cache"))
    p.add_argument("--json", default="")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ms = speed(ns.backbones, ns.sets[0])
    acc = accuracy(ns.backbones, ns.sets, ns.seeds, ns.bottleneck_dir)
    base = ns.backbones[-1]
    print(
        f"Extraction, ONNX Runtime, batch 32, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}:\n"
    )
    print("| backbone | ms/image | vs " + base + " |\n|---|---:|---:|")
    for name in ns.backbones:
        print(f"| {name} | {ms[name]:.2f} | {ms[name] / ms[base]:.2f}x |")
    print(
        "\nTest accuracy of the default run, mean (min-max) over seeds "
        + ", ".join(map(str, ns.seeds))
        + ":\n"
    )
    print(
        "| set | test photos | " + " | ".join(ns.backbones) + " |\n|---|---:|" + "---:|" * len(ns.backbones)
    )
    for set_name, by in acc.items():
        cells = []
        for name in ns.backbones:
            a = [100 * r["test_accuracy"] for r in by[name]]
            cells.append(f"{statistics.mean(a):.1f}% ({min(a):.1f}-{max(a):.1f})")
        print(f"| {set_name} | {by[base][0]['test_count']} | " + " | ".join(cells) + " |")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"ms_per_image": ms, "accuracy": acc}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
