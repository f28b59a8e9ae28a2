"""Every phone format of one trained model: size, check against ONNX, conversion time and latency per image.

    python benchmarks/mobile_formats.py [--graph MODEL.onnx] [--image_dir DIR] [--formats pt2 executorch ...]
                                        [--architecture efficientnet_lite0] [--json FILE]

Without ``--graph`` a model is trained on the bundled sample photos (``--architecture``), which are also the
check photos (labelled: accuracy change). Each format is written with ``retrain.convert.export_model``
(the library call behind ``retrain export``); its check is the one the command prints and stores. Latency:
batch 1, the median of 30 runs on one photo after 3 warm-up runs, in this process, with the format's runtime
here (ONNX Runtime, LiteRT, torch.export's module, the ExecuTorch runtime); Core ML has none off Apple
platforms. Formats whose extra is not installed are listed as skipped. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMATS = ["onnx", "onnx-int8", "tflite", "tflite-int8", "pt2", "executorch", "executorch-int8", "coreml"]
SUFFIX = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "tflite": ".tflite", "tflite-int8": ".int8.tflite"}
SUFFIX |= {"pt2": ".pt2", "executorch": ".pte", "executorch-int8": ".int8.pte", "coreml": ".mlpackage"}


def _runner(fmt: str, path: Path):
    """Something with predict_proba((1, S, S, 3) uint8), or None where no runtime exists here."""
    import retrain
    from retrain import mobile

    if fmt.startswith(("onnx", "tflite")):
        return retrain.load(path)
    if fmt == "pt2":
        import torch

        return mobile._ProgramRunner(torch.export.load(path).module())
    if fmt.startswith("executorch"):
        return mobile._PteRunner(path)
    return None


def _stored_check(fmt: str, path: Path) -> dict:
    """The check the export stored in the file's own metadata ({} for the ONNX formats, which store none)."""
    import retrain
    from retrain import mobile

    if fmt.startswith("tflite"):
        return retrain.load(path).manifest.get("check", {})
    if fmt == "pt2":
        return mobile.read_pt2_manifest(path).get("check", {})
    if fmt.startswith("executorch"):
        return mobile.read_pte_manifest(path).get("check", {})
    return {}


def _latency_ms(runner, pixel: np.ndarray) -> float:
    for _ in range(3):
        runner.predict_proba(pixel)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        runner.predict_proba(pixel)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import retrain
    from retrain.convert import export_model
    from retrain.mobile import MissingExtraError
    from retrain.quantize import load_pixels
    from retrain.sample_data import sample_image_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", default="")
    p.add_argument("--image_dir", default="")
    p.add_argument("--architecture", default="efficientnet_lite0")
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--bottleneck_dir", default=os.path.join(tempfile.gettempdir(), "mobile_formats_cache"))
    p.add_argument("--out_dir", default="")
    p.add_argument("--json", default="")
    ns = p.parse_args(argv)
    image_dir = Path(ns.image_dir or sample_image_dir())
    out_dir = Path(ns.out_dir or tempfile.mkdtemp(prefix="mobile_formats_"))
    graph = Path(ns.graph) if ns.graph else None
    if graph is None:
        run = retrain.train(
            image_dir,
            architecture=ns.architecture,
            bottleneck_dir=ns.bottleneck_dir,
            output_dir=str(out_dir / "run"),
            seed=0,
            quiet=True,
        )
        graph = run.output_graph
    onnx_clf = retrain.load(graph)
    pixel, _ = load_pixels(onnx_clf, [str(next(image_dir.rglob("*.jpg")))])
    rows = []
    for fmt in ns.formats:
        path = out_dir / f"model{SUFFIX[fmt]}"
        t0 = time.perf_counter()
        try:
            report = export_model(graph, fmt, path, image_dir=image_dir)
        except MissingExtraError as exc:
            rows.append({"format": fmt, "skipped": str(exc)})
            continue
        seconds = time.perf_counter() - t0
        runner = _runner(fmt, path)
        c = report.comparison
        unknown = _stored_check(fmt, path).get("unknown_score_max_diff")
        row = {
            "format": fmt,
            "mb": report.size_bytes / 1e6,
            "convert_s": seconds,
            "agreement": None if c is None else c.agreement,
            "max_prob_diff": None if c is None else c.max_prob_diff,
            "accuracy_change": None if c is None else c.accuracy_change,
            "count": None if c is None else c.count,
            "latency_ms": None if runner is None else _latency_ms(runner, pixel),
            "unknown_score_max_diff": unknown,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"Model {graph} ({onnx_clf.manifest['backbone']['name']}), checked on {image_dir}; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| format | size | same top-1 as ONNX | max prob. diff | unknown_score diff | accuracy change | convert "
        "| latency, batch 1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['format']} | skipped: {r['skipped']} ||||||| ")
            continue
        agree = "structure only" if r["agreement"] is None else f"{100 * r['agreement']:.1f}% of {r['count']}"
        diff = "" if r["max_prob_diff"] is None else f"{r['max_prob_diff']:.2g}"
        change = "" if r["accuracy_change"] is None else f"{r['accuracy_change']:+.1f} pt"
        unk = "" if r["unknown_score_max_diff"] is None else f"{r['unknown_score_max_diff']:.2g}"
        lat = "no runtime here" if r["latency_ms"] is None else f"{r['latency_ms']:.1f} ms"
        print(
            f"| {r['format']} | {r['mb']:.1f} MB | {agree} | {diff} | {unk} | {change} | {r['convert_s']:.0f} s | {lat} |"
        )
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
