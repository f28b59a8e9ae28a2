"""TFLite (LiteRT) model files: the manifest in their metadata, and running them with ai-edge-litert.

A ``.tflite`` written by ``retrain export --to tflite`` keeps the ONNX model's contract: one
signature ``serving_default`` with a uint8 RGB NHWC input named ``image`` (batch 1, the phone's
usual case) and class probabilities out; normalisation is inside the graph. The manifest (labels,
preprocessing, backbone, how it was converted and checked) is a metadata entry of the flatbuffer
(``Model.metadata``, name ``retrain.manifest``, UTF-8 JSON), next to whatever the converter
wrote, so it travels with the file and any app can read it (see docs/deploy.md).

Only ai-edge-litert is needed here (the LiteRT interpreter and its flatbuffer schema), not the
converter: ``pip install ai-edge-litert``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile

import numpy as np

from retrain.errors import ModelFileError, RetrainError

log = logging.getLogger("retrain")

MANIFEST_KEY = "retrain.manifest"
UNKNOWN_NAME = "unknown_score"  # retrain.export.UNKNOWN_NAME (not imported: that module imports onnx)
SIGNATURE = "serving_default"
RUNTIME_INSTALL = (
    "pip install 'ai-edge-litert>=2.3,<2.4' (or pip install -c constraints/ci.txt 'retrain[tflite]')"
)


@contextlib.contextmanager
def quiet_native_output():
    """Silence what native code (LiteRT, XLA, absl) writes straight to file descriptors 1 and 2.

    Kept in a temporary file and logged at debug level if the block fails."""
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        try:
            yield
        except BaseException:
            sink.seek(0)
            log.debug("native output:\n%s", sink.read()[-4000:].decode("utf-8", "replace"))
            raise
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def is_tflite(data: bytes) -> bool:
    """TFLite flatbuffers carry the file identifier ``TFL3`` at bytes 4..8."""
    return data[4:8] == b"TFL3"


def _schema():
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise RetrainError(f"reading a .tflite model needs the LiteRT runtime: {RUNTIME_INSTALL}") from None
    return schema_py_generated


def with_manifest(data: bytes, manifest: dict) -> bytes:
    """A copy of the TFLite flatbuffer ``data`` whose ``retrain.manifest`` metadata entry is ``manifest``."""
    import flatbuffers

    s = _schema()
    model = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    for buffer in model.buffers or []:
        # Converters may put large constants after the flatbuffer (offset/size from the file start);
        # repacking moves everything, so those bytes go back inside their buffers.
        if buffer.offset and buffer.offset > 1:
            buffer.data = np.frombuffer(data, np.uint8, count=buffer.size, offset=buffer.offset)
            buffer.offset = buffer.size = 0
    model.metadata = [
        m for m in (model.metadata or []) if m.name not in (MANIFEST_KEY, MANIFEST_KEY.encode())
    ]
    buffer = s.BufferT()
    buffer.data = np.frombuffer(json.dumps(manifest, ensure_ascii=False).encode("utf-8"), np.uint8)
    model.buffers.append(buffer)
    entry = s.MetadataT()
    entry.name, entry.buffer = MANIFEST_KEY, len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(data) + 65536)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_manifest(data: bytes, path: str = "model") -> dict:
    """The manifest stored by :func:`with_manifest`; ModelFileError if the file has none."""
    s = _schema()
    try:
        model = s.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == MANIFEST_KEY.encode():
                return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8"))
    except (ValueError, IndexError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelFileError(
            f"{path!r} is a TFLite file with damaged retrain metadata ({type(exc).__name__}); re-export it "
            "with `retrain export --to tflite`"
        ) from None
    raise ModelFileError(
        f"{path!r} is a TFLite model but was not written by retrain (no {MANIFEST_KEY!r} metadata), so its labels "
        "and preprocessing are unknown. Use a file written by `retrain export --to tflite`."
    )


class TFLiteEngine:
    """Runs a retrain TFLite model with the LiteRT interpreter: (N, H, W, 3) uint8 -> (N, C) probabilities.

    The file's input has batch 1 (what phones run); a batch is run image by image, which on the
    CPU costs nothing measurable against the convolutions.
    """

    concurrency = 1  # one interpreter; it is not safe to call from several threads at once

    def __init__(self, data: bytes, threads: int | None = None, path: str = "model"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RetrainError(
                f"running a .tflite model needs the LiteRT runtime: {RUNTIME_INSTALL}"
            ) from None
        try:
            with quiet_native_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate" on every load
                self.interpreter = Interpreter(model_content=data, num_threads=threads or os.cpu_count() or 1)
                self.runner = self.interpreter.get_signature_runner(SIGNATURE)
                inputs = self.runner.get_input_details()
                # The XNNPACK delegate is set up (and announced) on the first run.
                if list(inputs) == ["image"]:
                    self.runner(image=np.zeros(inputs["image"]["shape"], np.uint8))
        except Exception as exc:  # noqa: BLE001 - LiteRT raises ValueError/RuntimeError for bad files
            raise ModelFileError(
                f"{path!r} cannot be run by LiteRT ({type(exc).__name__}: {str(exc)[:200]}); re-export the model"
            ) from None
        if list(inputs) != ["image"]:
            raise ModelFileError(
                f"{path!r} takes inputs {list(inputs)}, not retrain's 'image'; re-export the model"
            )
        self.input_shape = tuple(int(d) for d in inputs["image"]["shape"])
        outputs = self.runner.get_output_details()
        # Probabilities under the manifest's output name, and ``unknown_score`` (N,) where the model has one.
        self.has_unknown = UNKNOWN_NAME in outputs
        self.probs_name = next(n for n in outputs if n != UNKNOWN_NAME)
        self.n_outputs = int(outputs[self.probs_name]["shape"][-1])

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W, 3) uint8 -> ((N, C) probabilities, (N,) unknown scores or None)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        runs = [self.runner(image=pixels[i : i + 1]) for i in range(len(pixels))]
        if not runs:
            return np.zeros((0, self.n_outputs), np.float32), (
                np.zeros(0, np.float32) if self.has_unknown else None
            )
        probs = np.concatenate([r[self.probs_name] for r in runs]).astype(np.float32, copy=False)
        unknown = (
            np.concatenate([r[UNKNOWN_NAME] for r in runs]).astype(np.float32) if self.has_unknown else None
        )
        return probs, unknown

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.predict(pixels)[0]
