"""How far the two engines' features are apart: ONNX Runtime (CPU) vs PyTorch, on the sample photos.

    python benchmarks/engine_agreement.py [--device cpu|cuda] [--images 16]

The numbers are why the engine is part of the bottleneck cache's namespace (see retrain/feature_cache.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from retrain.backbones import get_backbone
    from retrain.engines import OnnxEngine, TorchEngine
    from retrain.export import backbone_onnx_bytes
    from retrain.images import decode_image, read_image_bytes
    from retrain.sample_data import sample_image_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="where PyTorch runs (cpu or cuda)")
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    spec = get_backbone("efficientnet_lite0")
    photos = sorted(Path(sample_image_dir()).rglob("*.jpg"))
    photos = photos[:: max(1, len(photos) // args.images)][: args.images]
    size = spec.preprocessing.input_size
    pixels = np.stack([decode_image(read_image_bytes(str(p)), size) for p in photos])  # (N, S, S, 3)
    ort = OnnxEngine(backbone_onnx_bytes(spec))(pixels)  # (N, 1280)
    torch_features = TorchEngine(spec, args.device)(pixels)
    diff = np.abs(ort - torch_features)
    print(
        f"{len(pixels)} images, ONNX Runtime (CPU) vs PyTorch ({args.device}): max |diff| {diff.max():.2e}, "
        f"mean {diff.mean():.2e}, largest feature {ort.max():.2f}, bit-identical values {(diff == 0).mean():.1%}"
    )


if __name__ == "__main__":
    main()
