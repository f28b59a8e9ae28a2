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
from retrain.modelformat import (  # noqa: F401 - re-exported: writers and readers share these names
    FEATURES_NAME,
    INPUT_NAME,
    MANIFEST_KEY,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MULTI_LABEL,
    UNKNOWN_NAME,
    is_multi_label,
    manifest_from_metadata,
)

if TYPE_CHECKING:
    from retrain.backbones import BackboneSpec

EXPORTER_VERSION = 1  # bump when the backbone export changes
OPSET = 17


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrain" / "models"


def backbone_onnx_path(spec: BackboneSpec, model_dir: str | os.PathLike | None = None) -> Path:
    """The cached ONNX export of ``spec``'s pretrained backbone, created on first use (needs PyTorch)."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    path = (
        model_dir
        / f"{spec.name}-{spec.weights_id}-pre{spec.preprocessing.input_size}-x{EXPORTER_VERSION}.onnx"
    )
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
    thresholds=None,
) -> dict:
    """The model's self-description. ``thresholds`` (one per label) makes it a multi-label manifest:
    ``"kind": "multi_label"``, the thresholds, and an output of independent (sigmoid) probabilities."""
    manifest = {
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
    if thresholds is not None:
        if len(thresholds) != len(labels):
            raise ValueError(f"{len(thresholds)} thresholds for {len(labels)} labels")
        manifest["kind"] = MULTI_LABEL
        manifest["thresholds"] = [round(float(t), 6) for t in thresholds]
        manifest["output"]["kind"] = "independent_probabilities"
    return manifest


def build_classifier(
    backbone: onnx.ModelProto | bytes | str | os.PathLike,
    coef: np.ndarray,
    intercept: np.ndarray,
    manifest: dict,
    *,
    temperature: float = 1.0,
    unknown=None,
) -> onnx.ModelProto:
    """Append ``softmax((features @ coef + intercept) / temperature)`` to a pixels->features graph,
    and with ``unknown`` (:class:`retrain.openset.MahalanobisStats`) a second output ``unknown_score``.
    A multi-label ``manifest`` (:func:`make_manifest` with thresholds) gets ``sigmoid(features @ coef +
    intercept)`` instead: one independent probability per label.

    The temperature is folded into the weights: the graph is the same size and speed either way.
    """
    model = load_onnx(backbone)
    graph = model.graph
    out_name = manifest["output"]["name"]
    n_classes = coef.shape[1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(
                np.asarray(coef, np.float32) / np.float32(temperature), "final_retrain_ops/weights"
            ),
            numpy_helper.from_array(
                np.asarray(intercept, np.float32) / np.float32(temperature), "final_retrain_ops/biases"
            ),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "Gemm",
                [FEATURES_NAME, "final_retrain_ops/weights", "final_retrain_ops/biases"],
                ["logits"],
                name="final_retrain_ops/Wx_plus_b",
            ),
            helper.make_node("Sigmoid", ["logits"], [out_name], name=out_name)
            if is_multi_label(manifest)
            else helper.make_node("Softmax", ["logits"], [out_name], axis=1, name=out_name),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_classes]))
    if unknown is not None:
        _append_unknown_score(graph, unknown, "logits")
    set_manifest(model, manifest)
    return model


def _append_unknown_score(graph: onnx.GraphProto, unknown, logits: str) -> None:
    """``unknown_score`` (N,) = a * maha + b * logsumexp(logits) + c (:class:`retrain.openset.Combination`),
    maha = sqrt(max(0, min_c ||(x/|x| - center) W - m_c||^2) / D) from the features.

    The squared distance is expanded as ||z||^2 - 2 z.m_c + ||m_c||^2 (one product for all
    classes). The whitener is stored in float16 (half the bytes; ONNX Runtime casts it back
    once, when the session loads) -- its rounding moves scores by about 1e-3 relative.
    ``logits`` are the temperature-scaled logits (the temperature is folded into the layer).
    """
    stats, comb = unknown.stats, unknown.combination
    p = "unknown_score_ops/"
    W = np.asarray(stats.whitener, np.float32)  # (D, D)
    means = np.asarray(stats.means[stats.present], np.float32)  # (C', D), whitened
    d = W.shape[0]
    graph.initializer.extend(
        [
            numpy_helper.from_array(W.astype(np.float16), p + "whitener_f16"),
            numpy_helper.from_array(
                -(np.asarray(stats.center, np.float64) @ stats.whitener).astype(np.float32), p + "center_bias"
            ),
            numpy_helper.from_array(means, p + "class_means"),
            numpy_helper.from_array(
                (means.astype(np.float64) ** 2).sum(axis=1).astype(np.float32), p + "mean_norms"
            ),
            numpy_helper.from_array(np.array(1e-12, np.float32), p + "eps"),
            numpy_helper.from_array(np.array(1.0 / d, np.float32), p + "inv_dim"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceL2", [FEATURES_NAME], [p + "norm"], axes=[1], keepdims=1),
            helper.make_node("Max", [p + "norm", p + "eps"], [p + "norm_safe"]),
            helper.make_node("Div", [FEATURES_NAME, p + "norm_safe"], [p + "unit"]),
            helper.make_node("Cast", [p + "whitener_f16"], [p + "whitener"], to=TensorProto.FLOAT),
            helper.make_node("Gemm", [p + "unit", p + "whitener", p + "center_bias"], [p + "z"]),
            helper.make_node("ReduceSumSquare", [p + "z"], [p + "z_sq"], axes=[1], keepdims=1),
            helper.make_node(
                "Gemm",
                [p + "z", p + "class_means", p + "mean_norms"],
                [p + "cross"],
                alpha=-2.0,
                beta=1.0,
                transB=1,
            ),
            helper.make_node("Add", [p + "cross", p + "z_sq"], [p + "dist_sq"]),
            helper.make_node("ReduceMin", [p + "dist_sq"], [p + "nearest"], axes=[1], keepdims=0),
            helper.make_node("Mul", [p + "nearest", p + "inv_dim"], [p + "per_dim"]),
            helper.make_node("Relu", [p + "per_dim"], [p + "clamped"]),
            helper.make_node("Sqrt", [p + "clamped"], [p + "maha"]),
        ]
    )
    # energy = -logsumexp(logits), taken stably: max + log(sum(exp(logits - max))).
    use_energy = np.isfinite(comb.energy_spread)
    a = 1.0 / comb.maha_spread
    b = -1.0 / comb.energy_spread if use_energy else 0.0
    c = -comb.maha_mid / comb.maha_spread - (comb.energy_mid / comb.energy_spread if use_energy else 0.0)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(v, np.float32), p + name)
            for name, v in (("a", a), ("b", b), ("c", c))
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMax", [logits], [p + "lmax"], axes=[1], keepdims=1),
            helper.make_node("Sub", [logits, p + "lmax"], [p + "shifted"]),
            helper.make_node("Exp", [p + "shifted"], [p + "exp"]),
            helper.make_node("ReduceSum", [p + "exp", p + "sum_axes"], [p + "sum"], keepdims=0),
            helper.make_node("Log", [p + "sum"], [p + "log_sum"]),
            helper.make_node("Squeeze", [p + "lmax", p + "sum_axes"], [p + "lmax_1d"]),
            helper.make_node("Add", [p + "lmax_1d", p + "log_sum"], [p + "lse"]),
            helper.make_node("Mul", [p + "maha", p + "a"], [p + "maha_term"]),
            helper.make_node("Mul", [p + "lse", p + "b"], [p + "energy_term"]),
            helper.make_node("Add", [p + "maha_term", p + "energy_term"], [p + "terms"]),
            helper.make_node("Add", [p + "terms", p + "c"], [UNKNOWN_NAME], name=UNKNOWN_NAME),
        ]
    )
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), p + "sum_axes"))
    graph.output.append(helper.make_tensor_value_info(UNKNOWN_NAME, TensorProto.FLOAT, ["batch"]))


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
    open_world=None,
    thresholds=None,
) -> tuple[onnx.ModelProto, dict]:
    """(model, manifest): ``spec``'s backbone (or ``backbone_onnx``, a fine-tuned one) + ``head``'s layer,
    with ``open_world`` (:class:`retrain.openworld.OpenWorld`) its temperature and ``unknown_score``.
    ``thresholds`` (one per label): a multi-label model (sigmoid outputs, :func:`make_manifest`)."""
    manifest = make_manifest(
        spec,
        labels,
        output_name=output_name,
        fine_tuned=backbone_onnx is not None,
        metrics=metrics,
        thresholds=thresholds,
    )
    extra = {}
    if open_world is not None:  # intermediate snapshots stay uncalibrated and without the score
        manifest.update(open_world.manifest())
        extra = dict(temperature=open_world.temperature, unknown=open_world.unknown)
    source = backbone_onnx if backbone_onnx is not None else backbone_onnx_path(spec, model_dir)
    return build_classifier(source, head.coef_, head.intercept_, manifest, **extra), manifest


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
        spec,
        labels,
        head,
        backbone_onnx=backbone_onnx,
        model_dir=model_dir,
        output_name=output_name,
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
    return manifest_from_metadata({prop.key: prop.value for prop in model.metadata_props}, path)


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
