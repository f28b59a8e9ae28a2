"""Stage 5: classify images with an exported model, from Python or the command line.

>>> clf = retrain.load("output_graph.onnx")
>>> clf.classify(["daisy.jpg"])[0][0]
Prediction(label='daisy', score=0.97)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.backbones import Preprocessing
from retrain.errors import ModelFileError
from retrain.images import ImageError, decode_image, read_image_bytes
from retrain.modelformat import UNKNOWN_NAME, is_multi_label, manifest_from_metadata


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


class Ranked(list):
    """One image's predictions, best first (a list of :class:`Prediction`), and the unknown answer.

    ``unknown_score``: the model's ``unknown_score`` output (higher = less like any trained class),
    None for a model made without one; ``unknown``: whether it is above the threshold (None likewise).
    ``labels``: for a multi-label model, the labels at or above their threshold, best first (possibly
    empty); None for a single-label model.
    """

    def __init__(
        self,
        predictions=(),
        unknown_score: float | None = None,
        unknown: bool | None = None,
        labels: list[str] | None = None,
    ):
        super().__init__(predictions)
        self.unknown_score, self.unknown, self.labels = unknown_score, unknown, labels

    def to_dict(self) -> dict:
        """``{"predictions": [...], "unknown_score": ..., "unknown": ...}`` (no unknown keys for an old model);
        for a multi-label model ``{"predictions": [every label], "labels": [those at or above their threshold]}``."""
        out: dict = {"predictions": [{"label": p.label, "score": round(p.score, 6)} for p in self]}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.unknown_score is not None:
            out["unknown_score"] = round(self.unknown_score, 6)
            out["unknown"] = self.unknown
        return out


ImageInput = str | os.PathLike | bytes | np.ndarray


def _read_model_bytes(path: Path) -> bytes:
    """The model file's bytes, or a one-line ModelFileError saying what is wrong with the path."""
    try:
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO would block the read
            raise ModelFileError(f"{str(path)!r} is not a regular file; pass the model file itself")
        if path.is_file() and path.stat().st_size == 0:
            raise ModelFileError(f"model file {str(path)!r} is empty (0 bytes); was it fully written?")
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"model file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ModelFileError(f"{str(path)!r} is a folder without model.onnx") from None


def _onnx_engine(data: bytes, path: Path, threads: int | None):
    """An ONNX Runtime session for ``data``; a file it refuses gets a ModelFileError that says whether the
    file is not ONNX at all or an ONNX graph that cannot run (only then is the ``onnx`` package loaded)."""
    from retrain.engines import OnnxEngine

    try:
        return OnnxEngine(data, threads=threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        import onnx

        try:
            onnx.load_from_string(data)
        except Exception as parse_exc:  # noqa: BLE001 - onnx raises DecodeError and friends
            raise ModelFileError(
                f"{str(path)!r} is not an ONNX model written by retrain ({type(parse_exc).__name__}). "
                "Pass the file written by `retrain --output_graph`."
            ) from None
        raise ModelFileError(
            f"{str(path)!r} cannot be run by ONNX Runtime ({type(exc).__name__}: {str(exc)[:200]}); "
            "the file is damaged or was edited: re-export the model with retrain"
        ) from None


class Classifier:
    """A loaded model: labels, preprocessing and an ONNX Runtime session (or LiteRT, for a ``.tflite``)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        from retrain.tflite import is_tflite

        path = Path(path)
        if path.is_dir():  # a --saved_model_dir folder
            path = path / "model.onnx"
        data = _read_model_bytes(path)
        self.path = path
        tflite = is_tflite(data)
        if tflite:  # LiteRT reports its own errors as one line (ModelFileError / missing runtime)
            from retrain.tflite import TFLiteEngine, read_manifest

            manifest = self._checked(lambda: read_manifest(data, str(path)))
            self._engine = TFLiteEngine(data, threads, str(path))
            dims, self.has_unknown = [0, self._engine.n_outputs], self._engine.has_unknown
        else:
            self._engine = _onnx_engine(data, path, threads)
            session = self._engine.session
            manifest = self._checked(
                lambda: manifest_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
            )
            outputs = session.get_outputs()
            dims = [d if isinstance(d, int) else 0 for d in outputs[0].shape] if outputs else []
            # Models made before the unknown score have one output; they classify as before, without it.
            self.has_unknown = any(o.name == UNKNOWN_NAME for o in outputs)
        self.manifest = manifest
        if len(dims) == 2 and dims[1] and dims[1] != len(self.labels):
            raise ModelFileError(
                f"{str(path)!r} has {dims[1]} outputs but its manifest lists {len(self.labels)} labels; "
                "the file was edited: re-export the model with retrain"
            )
        self.input_size = self.preprocessing.input_size
        # A multi-label model: independent probabilities, a label is chosen at or above its threshold.
        self.multi_label = is_multi_label(self.manifest)
        self.thresholds: np.ndarray | None = None
        if self.multi_label:
            try:
                self.thresholds = np.asarray(self.manifest["thresholds"], np.float32).reshape(-1)
            except (KeyError, TypeError, ValueError):
                self.thresholds = np.zeros(0, np.float32)
            if len(self.thresholds) != len(self.labels):
                raise ModelFileError(
                    f"{str(path)!r} is a multi-label model whose manifest has {len(self.thresholds)} thresholds "
                    f"for {len(self.labels)} labels; re-export the model with retrain"
                )
        threshold = (self.manifest.get("unknown") or {}).get("threshold")
        # None in the manifest: the run had no held-out images to choose one from, so nothing is unknown.
        self.unknown_threshold: float | None = (
            (float("inf") if threshold is None else float(threshold)) if self.has_unknown else None
        )

    def _checked(self, read_manifest) -> dict:
        """The manifest from ``read_manifest()``, with the labels and preprocessing it must give."""
        try:
            manifest = read_manifest()
            self.labels: list[str] = [str(label) for label in manifest["labels"]]
            self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ModelFileError(
                f"{str(self.path)!r} has a damaged retrain manifest ({type(exc).__name__}: {exc}); "
                "re-export the model with retrain"
            ) from None
        return manifest

    def __repr__(self) -> str:
        kind = ", multi_label=True" if self.multi_label else ""
        return f"Classifier({str(self.path)!r}, labels={self.labels!r}{kind})"

    def to_pixels(self, image: ImageInput) -> np.ndarray:
        """One image -> (H, W, 3) uint8 at the model's input size, decoded as in training."""
        size, resample = self.input_size, self.preprocessing.resample
        if isinstance(image, np.ndarray):
            if image.shape == (size, size, 3) and image.dtype == np.uint8:
                return image
            raise ValueError(
                f"array input must be uint8 RGB of shape ({size}, {size}, 3), got {image.dtype} {image.shape}; "
                "pass a file path or encoded bytes to have it resized"
            )
        data = image if isinstance(image, bytes) else read_image_bytes(image)
        return decode_image(data, size, resample=resample)

    @property
    def unknown_note(self) -> str | None:
        """Why answers carry no unknown fields, for a model made before the unknown score (else None)."""
        if self.has_unknown or self.multi_label:  # multi-label models have no unknown score (yet)
            return None
        return (
            f"{self.path.name} has no unknown_score output (made before retrain could say 'unknown'); "
            "answers carry no unknown fields. Retrain to get them."
        )

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, n_classes) probabilities."""
        return self._engine(np.ascontiguousarray(pixels, dtype=np.uint8))

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W, 3) uint8 -> ((N, n_classes) probabilities, (N,) unknown scores or None), in one run."""
        if not hasattr(self._engine, "session"):  # LiteRT (a .tflite)
            return self._engine.predict(pixels)
        outputs = self._engine.session.run(
            None, {self._engine.input_name: np.ascontiguousarray(pixels, np.uint8)}
        )
        return outputs[0], (outputs[1] if self.has_unknown else None)

    def rank(self, probs: np.ndarray, top_k: int | None = 5, unknown_score: float | None = None) -> Ranked:
        """One image's :class:`Ranked`: the ``top_k`` best labels; a multi-label model ranks every label
        (``top_k`` only limits what a caller prints) and chooses those at or above their threshold."""
        if self.multi_label:
            order = np.argsort(-probs, kind="stable")
            chosen = [self.labels[i] for i in order if probs[i] >= self.thresholds[i]]
            return Ranked([Prediction(self.labels[i], float(probs[i])) for i in order], labels=chosen)
        order = np.argsort(-probs, kind="stable")[: top_k or len(probs)]
        preds = [Prediction(self.labels[i], float(probs[i])) for i in order]
        if unknown_score is None or not self.has_unknown:
            return Ranked(preds)
        score = float(unknown_score)
        return Ranked(preds, score, bool(score > self.unknown_threshold))

    def _ranked_batch(self, pixels: np.ndarray, top_k: int | None) -> list[Ranked]:
        probs, scores = self.predict(pixels)
        return [
            self.rank(p, top_k, None if scores is None else s)
            for p, s in zip(probs, scores if scores is not None else [None] * len(probs))
        ]

    def classify(
        self, images: ImageInput | Sequence[ImageInput], *, top_k: int | None = 5, batch_size: int = 32
    ) -> list[Ranked]:
        """Ranked predictions (best first) for each image, each with ``unknown_score`` and ``unknown``
        (None for a model made before them). Unreadable images raise ImageError."""
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)):
            images = [images]
        out: list[Ranked] = []
        for start in range(0, len(images), batch_size):
            chunk = [self.to_pixels(im) for im in images[start : start + batch_size]]
            out.extend(self._ranked_batch(np.stack(chunk), top_k))
        return out

    def classify_files(
        self, paths: Iterable[str], *, top_k: int | None = 5, batch_size: int = 32
    ) -> Iterable[tuple[str, Ranked | None, str | None]]:
        """Yield ``(path, predictions, None)`` or ``(path, None, reason)`` per file, never stopping on a bad one."""
        batch: list[tuple[str, np.ndarray]] = []

        def flush():
            ranked = self._ranked_batch(np.stack([px for _, px in batch]), top_k)
            for (p, _), row in zip(batch, ranked):
                yield p, row, None
            batch.clear()

        for path in paths:
            try:
                batch.append((path, self.to_pixels(path)))
            except ImageError as exc:
                if batch:
                    yield from flush()
                yield path, None, exc.reason
                continue
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()


def load(path: str | os.PathLike, *, threads: int | None = None) -> Classifier:
    """Load a model written by ``retrain``: an ``.onnx`` file, a ``--saved_model_dir`` folder, or a ``.tflite``
    written by ``retrain export --to tflite`` (run with ai-edge-litert)."""
    return Classifier(path, threads=threads)


def expand_image_paths(items: Iterable[str]) -> list[str]:
    """Files as given; folders are searched recursively for image files (sorted)."""
    from retrain.images import is_image_file_name

    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file_name(f))
        else:
            out.append(item)
    return out


def read_labels_file(path: str | os.PathLike, clf: Classifier) -> list[str]:
    """Labels from a file, which must have one line per model output."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise ModelFileError(f"cannot read labels file {str(path)!r}: {exc.strerror or exc}") from None
    labels = [line.rstrip("\r") for line in text.split("\n")]
    while labels and labels[-1] == "":
        labels.pop()
    if len(labels) != len(clf.labels):
        raise ModelFileError(
            f"labels file {str(path)!r} has {len(labels)} line(s), but the model has {len(clf.labels)} outputs "
            f"({', '.join(clf.labels[:5])}{', ...' if len(clf.labels) > 5 else ''}). Use the labels file written "
            "with this model, or leave --labels out: the model carries its labels."
        )
    return labels


# Names the tutorial's commands use for a retrained graph's input and output.
_LEGACY_INPUT_NAMES = {"Placeholder", "input", "Mul", "DecodeJpeg/contents"}


def check_legacy_flags(clf: Classifier, flags: dict) -> list[str]:
    """Notes for label_image flags that contradict the model; the model's values are always used."""
    notes = []
    size = clf.input_size
    for name in ("input_height", "input_width"):
        value = flags.get(name)
        if value is not None and value != size:
            notes.append(
                f"--{name} {value} ignored: this model takes {size}x{size} images (images are resized to it)"
            )
    prep = clf.preprocessing
    mean, std = flags.get("input_mean"), flags.get("input_std")
    if (mean is not None and any(abs(mean - m) > 1e-6 for m in prep.mean)) or (
        std is not None and any(abs(std - s) > 1e-6 for s in prep.std)
    ):
        notes.append(
            f"--input_mean/--input_std ignored: this model normalises pixels itself as (x - {prep.mean[0]:g}) / "
            f"{prep.std[0]:g}; passing other values would only make predictions wrong"
        )
    layer = flags.get("input_layer")
    input_name = clf.manifest["input"]["name"]
    if layer and layer.split(":")[0] not in _LEGACY_INPUT_NAMES | {input_name}:
        notes.append(f"--input_layer {layer} ignored: the model's input is {input_name!r}")
    layer = flags.get("output_layer")
    output_name = clf.manifest["output"]["name"]
    if layer and layer.split(":")[0] not in {output_name, "final_result"}:
        notes.append(f"--output_layer {layer} ignored: the model's output is {output_name!r}")
    return notes
