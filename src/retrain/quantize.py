"""Smaller copies of an exported model: int8 (static quantization) and fp16.

Both stay ONNX files with the same input (uint8 NHWC RGB "image") and output
(probabilities), and keep the manifest, so ``retrain.load``, ``label_image`` and
``retrain serve`` use them unchanged. The manifest records the format in
``manifest["quantization"]`` ("int8" or "fp16"; absent for float32 models).

int8 is ONNX Runtime's ``quantize_static``: QDQ format, per-channel int8 weights,
uint8 activations, MinMax ranges calibrated on real images decoded exactly as in
training. Two parts stay in float32, because measuring showed they carry most of
the error while holding almost none of the weights:

* the leading high-resolution layers, up to ``FLOAT_PREFIX`` (3%) of the weights
  (on EfficientNet-Lite0: the stem and the first six blocks) and the
  uint8->float normalisation before them;
* the new layer after ``features`` (Gemm + Softmax): uint8 logits would cap the
  probabilities' resolution, and it is tiny.

On the bundled sample photos this keeps top-1 identical to the float model with a
largest probability difference of about 0.005, where quantizing every layer flipped
a borderline test image (max difference 0.37). The file is about 30% of the float
model's size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from retrain.errors import RetrainError
from retrain.export import FEATURES_NAME, get_manifest, load_onnx, save_model, set_manifest
from retrain.images import ImageError

if TYPE_CHECKING:
    from retrain.data import Dataset
    from retrain.predict import Classifier

log = logging.getLogger("retrain")

FORMATS = ("int8", "fp16")
FLOAT_PREFIX = 0.03  # share of the weights, from the input side, kept in float32 by int8
MAX_CALIBRATION_IMAGES = 128  # more changes the ranges very little and costs time and memory
_CALIBRATION_BATCH = 8
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class QuantizeError(RetrainError):
    """A model cannot be converted as asked."""


@dataclass(frozen=True)
class Comparison:
    """A converted model against its float original on the same decoded images."""

    count: int
    agreement: float  # share of images whose top-1 label is the same
    max_prob_diff: float  # largest absolute difference of any probability
    float_accuracy: float | None = None  # None when the images have no labels
    accuracy: float | None = None

    @property
    def accuracy_change(self) -> float | None:
        """Points of accuracy gained (positive) or lost (negative)."""
        if self.accuracy is None or self.float_accuracy is None:
            return None
        return 100 * (self.accuracy - self.float_accuracy)


@dataclass
class QuantizeReport:
    format: str
    path: Path
    size_bytes: int
    float_size_bytes: int
    seconds: float
    calibration_count: int = 0
    comparison: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    unchecked: str = ""  # why no comparison was made, where that is not for want of labelled images (Core ML)

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.float_size_bytes

    def summary(self, eval_name: str = "test") -> str:
        text = (
            f"{self.format} model {self.path}: {_mb(self.size_bytes)} "
            f"({100 * self.size_ratio:.0f}% of the float model's {_mb(self.float_size_bytes)})"
        )
        c = self.comparison
        if c is None:
            return text + "; " + (self.unchecked or "accuracy not measured (no labelled images given)")
        if c.accuracy is not None:
            text += (
                f"; {eval_name} accuracy {100 * c.float_accuracy:.1f}% -> {100 * c.accuracy:.1f}% "
                f"({c.accuracy_change:+.1f} points, N={c.count})"
            )
        return (
            text
            + f"; same top-1 as float on {100 * c.agreement:.1f}%, max probability difference {c.max_prob_diff:.3g}"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        out["size_ratio"] = round(self.size_ratio, 4)
        if self.comparison is not None:
            out["comparison"]["accuracy_change"] = self.comparison.accuracy_change
        return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# -- conversions ----------------------------------------------------------------------------------
def quantize(
    model: onnx.ModelProto | str | os.PathLike,
    fmt: str,
    *,
    calibration: Iterable[np.ndarray] | np.ndarray | None = None,
) -> onnx.ModelProto:
    """A converted copy of ``model`` (``fmt`` "int8" or "fp16"), manifest kept and marked.

    ``calibration`` (int8 only): uint8 pixels, ``(N, H, W, 3)`` at the model's input
    size, or an iterable of such batches; real images from the training data.
    """
    model = load_onnx(model)
    if fmt == "int8":
        if calibration is None:
            raise QuantizeError(
                "int8 quantization needs calibration images (real photos like the training set)"
            )
        return quantize_int8(model, calibration)
    if fmt == "fp16":
        return convert_fp16(model)
    raise QuantizeError(f"unknown quantization {fmt!r}; expected one of {', '.join(FORMATS)}")


def quantize_int8(
    model: onnx.ModelProto,
    calibration: Iterable[np.ndarray] | np.ndarray,
    *,
    float_prefix: float = FLOAT_PREFIX,
) -> onnx.ModelProto:
    """ONNX Runtime static quantization (see the module docstring for the choices)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    manifest = get_manifest(model)
    reader = _CalibrationReader(model.graph.input[0].name, calibration)
    with tempfile.TemporaryDirectory(prefix="retrain-int8-") as tmp:
        src, pre, out = (os.path.join(tmp, name) for name in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, src)
        with _quiet():
            # Shape inference + constant folding; the quantizer needs shapes on every tensor.
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            pre_model = onnx.load(pre)
            excluded = float_nodes(pre_model, float_prefix)
            quantize_static(
                pre_model,
                out,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,  # measured without VNNI (AVX2): full range was the more accurate
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
                # No CalibMaxIntermediateOutputs: ONNX Runtime drops (not merges) the batches it flushes.
                # MinMax keeps only a min and a max per tensor per batch, so memory stays small anyway.
            )
        if reader.count == 0:
            raise QuantizeError("int8 calibration got no images; pass at least one readable photo")
        quantized = onnx.load(out)
    _restore_float16_constants(model, quantized)
    n_weighted = sum(1 for n in pre_model.graph.node if _is_weighted(n, _initializers(pre_model)))
    n_float = sum(1 for n in pre_model.graph.node if n.name in set(excluded) and n.op_type in _WEIGHTED_OPS)
    set_manifest(
        quantized,
        {
            **manifest,
            "quantization": "int8",
            "quantization_details": {
                "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax",
                "calibration_images": reader.count,
                "float_layers": f"{n_float} of {n_weighted} weighted layers kept in float32 (input side and new layer)",
            },
        },
    )
    return quantized


def _restore_float16_constants(source: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Put back the float16 constants (e.g. the unknown score's whitener) that pre-processing folded.

    ``quant_pre_process`` folds each ``Cast(float16 constant -> float32)`` into a float32 constant
    twice the size; those nodes stay in float32 anyway, so the folding only doubles the file.
    """
    from onnx import TensorProto, helper

    inits = {i.name: i for i in source.graph.initializer if i.data_type == TensorProto.FLOAT16}
    casts = {n.output[0]: n for n in source.graph.node if n.op_type == "Cast" and n.input[0] in inits}
    folded = [i for i in quantized.graph.initializer if i.name in casts and i.data_type == TensorProto.FLOAT]
    for init in folded:
        cast = casts[init.name]
        quantized.graph.initializer.remove(init)
        quantized.graph.initializer.append(inits[cast.input[0]])
        quantized.graph.node.insert(
            0,
            helper.make_node(
                "Cast", list(cast.input), list(cast.output), name=cast.name or None, to=TensorProto.FLOAT
            ),
        )


def float_nodes(model: onnx.ModelProto, float_prefix: float = FLOAT_PREFIX) -> list[str]:
    """Names of the nodes int8 leaves in float32: the input-side prefix and everything after ``features``."""
    nodes = list(model.graph.node)  # topologically sorted, as ONNX requires
    inits = _initializers(model)
    weighted = [(i, _weight_count(n, inits)) for i, n in enumerate(nodes) if _is_weighted(n, inits)]
    total = sum(w for _, w in weighted) or 1
    first_quantized, seen = len(nodes), 0
    for i, w in weighted:
        seen += w
        if seen > float_prefix * total:
            first_quantized = i
            break
    excluded = {n.name for n in nodes[:first_quantized]}
    tail = _downstream(nodes, FEATURES_NAME)
    if not tail:  # not a retrain graph layout: at least keep the probabilities in float
        tail = {n.name for n in nodes if n.op_type == "Softmax"}
    return sorted(excluded | tail)


def _downstream(nodes: Sequence[onnx.NodeProto], tensor: str) -> set[str]:
    live, names = {tensor}, set()
    for n in nodes:
        if live.intersection(n.input):
            names.add(n.name)
            live.update(n.output)
    return names


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _is_weighted(node: onnx.NodeProto, inits: dict) -> bool:
    return node.op_type in _WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in inits


def _weight_count(node: onnx.NodeProto, inits: dict) -> int:
    return int(np.prod(inits[node.input[1]].dims))


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over batches of uint8 pixels."""

    def __init__(self, input_name: str, calibration: Iterable[np.ndarray] | np.ndarray):
        self.input_name = input_name
        self.count = 0
        if isinstance(calibration, np.ndarray):
            pixels = calibration
            calibration = (
                pixels[i : i + _CALIBRATION_BATCH] for i in range(0, len(pixels), _CALIBRATION_BATCH)
            )
        self._batches: Iterator[np.ndarray] = iter(calibration)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if batch.ndim == 3:
            batch = batch[None]
        self.count += len(batch)
        return {self.input_name: batch}

    def __iter__(self):
        return iter(self.get_next, None)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and arithmetic; the uint8 input and float32 probabilities stay as they are."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise QuantizeError(
            "fp16 conversion needs the onnxconverter-common package: pip install 'retrain[export]' "
            "or pip install onnxconverter-common"
        ) from None
    manifest = get_manifest(model)
    # The uint8->float Cast must keep casting to float32: the converter would retype its output
    # but leave its `to` attribute behind, and ONNX Runtime refuses the graph.
    for i, node in enumerate(model.graph.node):  # the converter names its casts after nodes: no two alike
        node.name = node.name or f"retrain_node_{i}"
    keep = [n.name for n in model.graph.node if n.op_type == "Cast"]
    with _quiet():
        # check_fp16_ready off: the unknown score's whitener is float16 already, behind its own Cast.
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=keep, check_fp16_ready=False
        )
    set_manifest(
        half,
        {
            **manifest,
            "quantization": "fp16",
            "quantization_details": {
                "method": "onnxconverter-common float16 (keep_io_types), float32 input cast"
            },
        },
    )
    return half


@contextlib.contextmanager
def _quiet():
    """The converters' warnings and log lines (truncated tiny weights, ORT notes) mean nothing to a user."""
    ort_log = logging.getLogger("onnxruntime")
    root_level = logging.getLogger().level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = ort_log.level
        ort_log.setLevel(logging.ERROR)
        logging.getLogger().setLevel(max(root_level, logging.WARNING))
        try:
            yield
        finally:
            ort_log.setLevel(old)
            logging.getLogger().setLevel(root_level)


# -- images and measurements ------------------------------------------------------------------------
def load_pixels(clf: Classifier, paths: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Decode ``paths`` as the model expects; returns ``(N, H, W, 3)`` and the indices that could be read."""
    rows, kept = [], []
    for i, path in enumerate(paths):
        try:
            rows.append(clf.to_pixels(path))
            kept.append(i)
        except ImageError:
            continue
    size = clf.input_size
    return (np.stack(rows) if rows else np.zeros((0, size, size, 3), np.uint8)), kept


def pick_calibration(
    paths_by_class: Sequence[Sequence[str]], limit: int = MAX_CALIBRATION_IMAGES
) -> list[str]:
    """Up to ``limit`` paths taken round-robin over the classes, so every class shapes the ranges."""
    queues = [list(p) for p in paths_by_class if p]
    out: list[str] = []
    while queues and len(out) < limit:
        for q in list(queues):
            if len(out) == limit:
                break
            out.append(q.pop(0))
            if not q:
                queues.remove(q)
    return out


def compare(
    float_clf: Classifier,
    converted: Classifier,
    pixels: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 32,
) -> Comparison:
    """Run both models on the same ``(N, H, W, 3)`` pixels; accuracies when true ``labels`` are given."""
    if not len(pixels):
        raise QuantizeError("no readable images to compare the models on")
    a = np.concatenate(
        [float_clf.predict_proba(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )
    b = np.concatenate(
        [converted.predict_proba(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )
    top_a, top_b = a.argmax(1), b.argmax(1)
    acc_a = acc_b = None
    if labels is not None:
        acc_a, acc_b = float((top_a == labels).mean()), float((top_b == labels).mean())
    return Comparison(
        count=len(pixels),
        agreement=float((top_a == top_b).mean()),
        max_prob_diff=float(np.abs(a - b).max()),
        float_accuracy=acc_a,
        accuracy=acc_b,
    )


def convert_file(
    float_path: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike,
    *,
    calibration_paths: Sequence[str] = (),
    eval_paths: Sequence[str] = (),
    eval_labels: Sequence[int] | None = None,
) -> QuantizeReport:
    """Convert the model file at ``float_path``, write it to ``output`` and measure it.

    ``calibration_paths``: image files for int8 ranges. ``eval_paths`` (with ``eval_labels``,
    indices into the model's labels, or None): images on which the two models are compared.
    The comparison is also stored in the converted model's manifest.
    """
    from retrain.predict import load

    t0 = time.perf_counter()
    float_clf = load(float_path)
    calibration = None
    if fmt == "int8":
        calibration, _ = load_pixels(float_clf, list(calibration_paths))
        if not len(calibration):
            raise QuantizeError(
                "int8 quantization needs readable calibration images (a few dozen photos like the training set); "
                f"got {len(calibration_paths)} path(s), none readable"
            )
    # "float32": a checked copy (the manifest is read and the graph run before it is written).
    model = (
        load_onnx(float_clf.path)
        if fmt == "float32"
        else quantize(float_clf.path, fmt, calibration=calibration)
    )
    output = Path(output)
    save_model(model, output)
    report = QuantizeReport(
        format=fmt,
        path=output,
        size_bytes=output.stat().st_size,
        float_size_bytes=float_clf.path.stat().st_size,
        seconds=0.0,
        calibration_count=0 if calibration is None else len(calibration),
    )
    if eval_paths:
        pixels, kept = load_pixels(float_clf, list(eval_paths))
        # A multi-label model has no one right answer per folder: compare the two models' outputs only.
        single = eval_labels is not None and not float_clf.multi_label
        labels = np.asarray([eval_labels[i] for i in kept], np.int64) if single else None
        if len(pixels):
            report.comparison = compare(float_clf, load(output), pixels, labels)
            if fmt != "float32":
                manifest = get_manifest(model)
                manifest["quantization_details"]["comparison"] = asdict(report.comparison)
                set_manifest(model, manifest)
                save_model(model, output)
                report.size_bytes = output.stat().st_size
        skipped = len(eval_paths) - len(kept)
        if skipped:
            report.notes.append(f"{skipped} evaluation image(s) could not be read and were left out")
    report.seconds = time.perf_counter() - t0
    return report


def converted_path(output_graph: str | os.PathLike, fmt: str) -> Path:
    """``output_graph.onnx`` -> ``output_graph.int8.onnx``."""
    p = Path(output_graph)
    return p.with_name(f"{p.stem}.{fmt}{p.suffix or '.onnx'}")


# -- at training time ---------------------------------------------------------------------------------
def quantize_after_training(
    model_path: str | os.PathLike, fmt: str, dataset: Dataset, *, test_seen: bool = False
) -> QuantizeReport:
    """``retrain --quantize int8|fp16``: convert the model at ``model_path``, calibrating on ``dataset``'s
    training images and measuring on its test split (records carry their split); logs the size and
    accuracy change. Writes ``<model>.<fmt>.onnx`` beside it. ``test_seen``: the exported layer learned from
    the test images too (``--final_fit all``), so the accuracies compared are not the run's test accuracy, and
    the log says so; what the comparison measures, the conversion's change, is as meaningful."""
    from retrain.data import TESTING, TRAINING

    if fmt not in FORMATS:
        raise QuantizeError(f"--quantize must be one of {', '.join(FORMATS)}, got {fmt!r}")
    by_class: list[list[str]] = [[] for _ in dataset.labels]
    for r in dataset.split(TRAINING):
        by_class[r.label_index].append(r.path)
    test = dataset.split(TESTING)
    out = converted_path(model_path, fmt)
    log.info("Writing the %s model %s ...", fmt, out)
    report = convert_file(
        model_path,
        fmt,
        out,
        calibration_paths=pick_calibration(by_class) if fmt == "int8" else (),
        eval_paths=[r.path for r in test],
        eval_labels=[r.label_index for r in test],
    )
    log.info("%s", report.summary("test-image (folded into the exported layer)" if test_seen else "test"))
    for note in report.notes:
        log.warning("%s", note)
    return report
