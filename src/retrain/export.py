"""Stage 4: the self-contained model file.

One ONNX graph from an RGB uint8 image tensor (N, H, W, 3) to class probabilities:
normalisation + backbone + new layer + softmax. Its metadata carries the manifest:
labels in output order, input size and preprocessing, backbone id, metrics. Nothing
at inference time asks the user for mean, std or tensor names.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from retrain import __version__
from retrain.cache import atomic_write_bytes
from retrain.errors import ModelFileError, RetrainError
from retrain.images import DECODE_VERSION

if TYPE_CHECKING:
    from retrain.backbones import BackboneSpec

MANIFEST_KEY = "retrain.manifest"
MODEL_FORMAT = "retrain-model"
MODEL_FORMAT_VERSION = 1
INPUT_NAME = "image"
FEATURES_NAME = "features"
EXPORTER_VERSION = 1  # bump when the backbone export changes
OPSET = 17


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrain" / "models"


def backbone_onnx_path(spec: BackboneSpec, model_dir: str | os.PathLike | None = None) -> Path:
    """The cached ONNX export of ``spec``'s pretrained backbone, created on first use (needs PyTorch)."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    path = model_dir / f"{spec.name}-{spec.weights_id}-pre{spec.preprocessing.input_size}-x{EXPORTER_VERSION}.onnx"
    if not path.exists():
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RetrainError(f"cannot create --model_dir {str(model_dir)!r}: {exc.strerror}") from exc
        atomic_write_bytes(path, backbone_onnx_bytes(spec))
    return path


def backbone_onnx_bytes(spec: BackboneSpec, net=None) -> bytes:
    """Export pixels -> features for ``spec`` (its pretrained net, or ``net`` after fine-tuning)."""
    import io

    import torch

    from retrain.torch_modules import PixelsToFeatures

    module = PixelsToFeatures(net if net is not None else spec.build(), spec.preprocessing).eval()
    size = spec.preprocessing.input_size
    dummy = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    buf = io.BytesIO()
    # The legacy TorchScript exporter handles our static-shape nets without extra packages (the dynamo
    # exporter needs onnxscript); its deprecation and constant-folding notes mean nothing to a user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[FEATURES_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
        )
    return buf.getvalue()


def make_manifest(
    spec: BackboneSpec,
    labels: list[str],
    *,
    output_name: str = "final_result",
    fine_tuned: bool = False,
    metrics: dict | None = None,
) -> dict:
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "labels": list(labels),
        "backbone": {"name": spec.name, "weights_id": spec.weights_id, "feature_dim": spec.feature_dim},
        "fine_tuned": fine_tuned,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "color": "RGB",
            "height": spec.preprocessing.input_size,
            "width": spec.preprocessing.input_size,
        },
        "output": {"name": output_name, "kind": "probabilities"},
        "preprocessing": {**spec.preprocessing.to_dict(), "decode_version": DECODE_VERSION},
        "metrics": dict(metrics or {}),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "retrain_version": __version__,
    }


def build_classifier(
    backbone: onnx.ModelProto | bytes | str | os.PathLike,
    coef: np.ndarray,
    intercept: np.ndarray,
    manifest: dict,
) -> onnx.ModelProto:
    """Append ``softmax(features @ coef + intercept)`` to a pixels->features graph."""
    model = load_onnx(backbone)
    graph = model.graph
    out_name = manifest["output"]["name"]
    n_classes = coef.shape[1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(coef, np.float32), "final_retrain_ops/weights"),
            numpy_helper.from_array(np.asarray(intercept, np.float32), "final_retrain_ops/biases"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gemm", [FEATURES_NAME, "final_retrain_ops/weights", "final_retrain_ops/biases"],
                             ["logits"], name="final_retrain_ops/Wx_plus_b"),
            helper.make_node("Softmax", ["logits"], [out_name], axis=1, name=out_name),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_classes]))
    set_manifest(model, manifest)
    return model


def load_onnx(source: onnx.ModelProto | bytes | str | os.PathLike) -> onnx.ModelProto:
    """An ONNX model from a model, its bytes or a file; a missing file is a :class:`ModelFileError`."""
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, bytes):
        return onnx.load_from_string(source)
    try:
        return onnx.load(os.fspath(source))
    except FileNotFoundError:
        raise ModelFileError(f"model file {str(source)!r} does not exist") from None


def classifier_model(
    spec: BackboneSpec,
    labels: list[str],
    head,
    *,
    backbone_onnx: bytes | None = None,
    model_dir: str | os.PathLike | None = None,
    output_name: str = "final_result",
    metrics: dict | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """(model, manifest): ``spec``'s backbone (or ``backbone_onnx``, a fine-tuned one) + ``head``'s layer."""
    manifest = make_manifest(
        spec, labels, output_name=output_name, fine_tuned=backbone_onnx is not None, metrics=metrics
    )
    source = backbone_onnx if backbone_onnx is not None else backbone_onnx_path(spec, model_dir)
    return build_classifier(source, head.coef_, head.intercept_, manifest), manifest


def export_model(
    head,
    labels: list[str],
    path: str | os.PathLike,
    *,
    architecture: str | BackboneSpec = "efficientnet_lite0",
    backbone_onnx: bytes | None = None,
    model_dir: str | os.PathLike | None = None,
    output_name: str = "final_result",
    metrics: dict | None = None,
) -> Path:
    """Write the self-contained model: uint8 RGB (N, H, W, 3) in, probabilities over ``labels`` out.

    ``head`` is a fitted :class:`~retrain.head.SoftmaxHead` (or fine-tuned head: then pass the
    ``backbone_onnx`` that :func:`~retrain.finetune.fine_tune` returned). Returns the path written.
    """
    from retrain.backbones import get_backbone

    spec = architecture if not isinstance(architecture, str) else get_backbone(architecture)
    model, _ = classifier_model(
        spec, labels, head, backbone_onnx=backbone_onnx, model_dir=model_dir, output_name=output_name,
        metrics=metrics,
    )
    return save_model(model, path)


def set_manifest(model: onnx.ModelProto, manifest: dict) -> None:
    for prop in list(model.metadata_props):
        if prop.key == MANIFEST_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, json.dumps(manifest, ensure_ascii=False)
    model.producer_name, model.producer_version = "retrain", __version__


def get_manifest(model: onnx.ModelProto, path: str = "model") -> dict:
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return json.loads(prop.value)
    raise ModelFileError(
        f"{path!r} is an ONNX model but was not written by retrain (no {MANIFEST_KEY!r} metadata), "
        "so its labels and preprocessing are unknown. Use a model written by `retrain --output_graph`."
    )


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def write_labels(labels: list[str], path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_bytes(path, "".join(f"{label}\n" for label in labels).encode("utf-8", "surrogateescape"))
    return path


def write_saved_model_dir(directory: str | os.PathLike, model: onnx.ModelProto, manifest: dict) -> Path:
    """A serving folder: ``model.onnx``, ``labels.txt`` and ``manifest.json``, replaced as a whole."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_model(model, staging / "model.onnx")
    write_labels(manifest["labels"], staging / "labels.txt")
    atomic_write_bytes(staging / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)
    return directory
