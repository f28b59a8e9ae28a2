"""Extraction precision: the float32 backbone, or an int8 copy that runs faster on CPUs with VNNI.

``int8`` is the float backbone through :func:`retrain.quantize.quantize_int8` (static QDQ,
per-channel int8 weights, the input-side layers kept in float32), calibrated on the bundled
sample photos, so every user and every worker of a cluster builds the same int8 model. Its
features differ from float32 ones, so they get their own cache namespace, derived from the
int8 model's bytes: a different ONNX Runtime quantizer gives another model and so another
namespace, never a silent mix. The exported classifier embeds the same int8 backbone, so
the new layer sees at inference the features it was trained on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from retrain.backbones import BackboneSpec
from retrain.cache import atomic_write_bytes
from retrain.errors import RetrainError

PRECISIONS = ("float32", "int8")
INT8_RECIPE = 1  # bump when the calibration set or the quantization settings change


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise RetrainError(
            f"--extraction_precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return precision


def backbone_model_path(spec: BackboneSpec, precision: str = "float32", model_dir=None) -> Path:
    """The ONNX pixels->features backbone for ``precision``, built and cached on first use."""
    from retrain.export import backbone_onnx_path

    float_path = backbone_onnx_path(spec, model_dir)
    if check_precision(precision) == "float32":
        return float_path
    path = float_path.with_name(f"{float_path.stem}-int8r{INT8_RECIPE}.onnx")
    if not path.exists():
        atomic_write_bytes(path, _quantized_backbone(spec, float_path))
    return path


def engine_kind(spec: BackboneSpec, precision: str = "float32", model_dir=None) -> str:
    """The cache namespace's engine for ``precision`` on the CPU; int8 names its model by content."""
    from retrain.feature_cache import CPU_ENGINE

    if check_precision(precision) == "float32":
        return CPU_ENGINE
    digest = hashlib.sha256(backbone_model_path(spec, precision, model_dir).read_bytes()).hexdigest()[:16]
    return f"{CPU_ENGINE}-int8r{INT8_RECIPE}-{digest}"


def feature_namespace(spec: BackboneSpec, precision: str = "float32", model_dir=None) -> str:
    """Cache namespace of CPU features at ``precision`` (float32: the local CPU path's, unchanged)."""
    from retrain.feature_cache import cache_namespace

    return cache_namespace(spec, engine_kind(spec, precision, model_dir))


def make_extraction_engine(
    spec: BackboneSpec,
    *,
    precision: str = "float32",
    device: str = "auto",
    model_dir=None,
    workers: int | None = None,
):
    """The local extraction engine: ``make_engine`` for float32, ONNX Runtime on the int8 model for int8."""
    from retrain.engines import OnnxEngine, extraction_plan, make_engine

    if check_precision(precision) == "float32":
        return make_engine(spec, device=device, model_dir=model_dir, workers=workers)
    if device == "cuda":
        raise RetrainError(
            "--extraction_precision int8 runs on the CPU; use --device cpu or auto, or float32 on a GPU"
        )
    n, per_call = extraction_plan("cpu", workers)
    engine = OnnxEngine(backbone_model_path(spec, precision, model_dir), threads=per_call, concurrency=n)
    engine.kind = engine_kind(spec, precision, model_dir)
    return engine


def with_extraction_backbone(model, manifest: dict, spec: BackboneSpec, cfg, head, open_world=None):
    """The classifier rebuilt on the backbone its features came from (int8), manifest saying so; with
    ``open_world``'s temperature and unknown score, fitted on those same features."""
    from retrain.export import build_classifier, set_manifest

    del model
    manifest = {**manifest, "extraction_precision": cfg.extraction_precision}
    source = backbone_model_path(spec, cfg.extraction_precision, cfg.model_dir or None).read_bytes()
    extra = {} if open_world is None else dict(temperature=open_world.temperature, unknown=open_world.unknown)
    model = build_classifier(source, head.coef_, head.intercept_, manifest, **extra)
    set_manifest(model, manifest)
    return model, manifest


def _decoder() -> str:
    from retrain.images import DECODE_VERSION

    return DECODE_VERSION


def _quantized_backbone(spec: BackboneSpec, float_path: Path) -> bytes:
    import numpy as np
    import onnx

    from retrain.export import set_manifest
    from retrain.images import decode_image
    from retrain.quantize import MAX_CALIBRATION_IMAGES, pick_calibration, quantize_int8
    from retrain.sample_data import sample_image_dir

    root = Path(sample_image_dir())
    by_class = [
        sorted(str(p) for p in d.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for d in sorted(root.iterdir())
        if d.is_dir()
    ]
    size, resample = spec.preprocessing.input_size, spec.preprocessing.resample
    pixels = np.stack(
        [
            decode_image(Path(p).read_bytes(), size, resample=resample)
            for p in pick_calibration(by_class, MAX_CALIBRATION_IMAGES)
        ]
    )
    model = onnx.load(os.fspath(float_path))
    set_manifest(
        model, {"backbone": spec.name}
    )  # quantize_int8 carries a manifest through; a backbone has none
    quantized = quantize_int8(model, [pixels[i : i + 8] for i in range(0, len(pixels), 8)])
    del quantized.metadata_props[:]
    return quantized.SerializeToString()
