"""The names a retrain model file is read by: its manifest key, tensor names and model kinds.

Kept apart from :mod:`retrain.export` so that reading a model (``label_image``, ``retrain.load``, the
server) never imports the ``onnx`` package, whose start-up (~0.7 s, most of it ``ml_dtypes``) would
double the time ``label_image`` takes to classify one photo. ONNX Runtime reads the metadata itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from retrain.errors import ModelFileError

MANIFEST_KEY = "retrain.manifest"
MODEL_FORMAT = "retrain-model"
MODEL_FORMAT_VERSION = 1
INPUT_NAME = "image"
FEATURES_NAME = "features"
UNKNOWN_NAME = "unknown_score"
MULTI_LABEL = "multi_label"  # manifest "kind" of a model with one sigmoid output per label


def is_multi_label(manifest: dict) -> bool:
    """Whether a model's manifest describes independent per-label probabilities (sigmoid outputs)."""
    return manifest.get("kind") == MULTI_LABEL


def manifest_from_metadata(metadata: Mapping[str, str], path: str = "model") -> dict:
    """The manifest in a model's key -> value metadata (ONNX ``metadata_props``, as ONNX Runtime gives them)."""
    if MANIFEST_KEY in metadata:
        return json.loads(metadata[MANIFEST_KEY])
    raise ModelFileError(
        f"{path!r} is an ONNX model but was not written by retrain (no {MANIFEST_KEY!r} metadata), "
        "so its labels and preprocessing are unknown. Use a model written by `retrain --output_graph`."
    )
