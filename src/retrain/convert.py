"""``retrain export``: write a model in another format, with its size and accuracy change.

    >>> from retrain.convert import export_model
    >>> report = export_model("output_graph.onnx", "onnx-int8", "model.int8.onnx", image_dir="photos")
    >>> print(report.summary())

Formats offered are the ones whose result is checked here (tests/test_quantize.py,
tests/test_mobile.py): ONNX float32 (a copy), int8 and fp16, and TFLite float32 and int8
(``retrain.mobile``, converted from the PyTorch modules; optional extra ``retrain[tflite]``),
all read by ``retrain.load`` and ``label_image``; and a ``torch.export`` program (``pt2``),
checked with ``torch.export.load``; ExecuTorch ``.pte`` (checked with its runtime) and Core ML
(structure-checked only: it runs on Apple platforms). TorchScript is not offered; ``NOT_OFFERED`` says why.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from retrain.errors import RetrainError
from retrain.mobile import MOBILE_FORMATS
from retrain.quantize import MAX_CALIBRATION_IMAGES, QuantizeReport, convert_file, pick_calibration

EXPORT_FORMATS = {
    "onnx": "float32 ONNX, a checked copy of the model",
    "onnx-int8": "int8 ONNX (ONNX Runtime static quantization, calibrated on --image_dir or --calibration_dir)",
    "onnx-fp16": "float16 ONNX (onnxconverter-common), half the size",
    **MOBILE_FORMATS,
}

NOT_OFFERED = {
    "torchscript": "TorchScript is deprecated in PyTorch in favour of torch.export: use --to pt2 (a torch.export "
    "program of the same modules, loaded with torch.export.load)",
}


def export_model(
    graph: str | os.PathLike,
    to: str,
    output: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    calibration_dir: str | os.PathLike | None = None,
    max_calibration_images: int = MAX_CALIBRATION_IMAGES,
) -> QuantizeReport:
    """Write ``graph`` as format ``to`` at ``output``.

    ``image_dir``: a folder of class sub-folders named like the model's labels; the
    converted model is compared with the float one on all its images (accuracy change,
    top-1 agreement) and, without ``calibration_dir``, int8 is calibrated on them.
    ``calibration_dir``: any folder of photos (searched recursively) for int8 ranges.
    """
    fmt = _check_format(to)
    if max_calibration_images < 1:
        raise RetrainError(f"--max_calibration_images must be at least 1, got {max_calibration_images}")
    graph, output = Path(graph), Path(output)
    if output.exists() and output.resolve() == graph.resolve():
        raise RetrainError(f"--output {str(output)!r} is the --graph file itself; choose another output path")
    if fmt in MOBILE_FORMATS:
        from retrain.mobile import require

        require(fmt)  # before reading any photo: a missing extra is one line, at once
    eval_paths, eval_labels, by_class = _labelled_images(graph, image_dir) if image_dir else ([], None, [])
    calibration: list[str] = []
    if fmt == "int8":
        if calibration_dir:
            found = _folder_images(calibration_dir, "--calibration_dir")
            calibration = found[:: -(-len(found) // max_calibration_images)]  # evenly spread over the folder
        elif image_dir:
            calibration = pick_calibration(by_class, max_calibration_images)
        else:
            raise RetrainError(
                "onnx-int8 needs real photos to calibrate on: pass --image_dir (class sub-folders, also used "
                "to measure the accuracy change) or --calibration_dir (any folder of photos like the training set)"
            )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RetrainError(
            f"cannot create the folder of --output {str(output)!r}: {exc.strerror or exc}"
        ) from None
    if fmt in MOBILE_FORMATS:
        return _export_mobile(graph, fmt, output, image_dir, calibration_dir, eval_paths, eval_labels)
    return convert_file(
        graph, fmt, output, calibration_paths=calibration, eval_paths=eval_paths, eval_labels=eval_labels
    )


def _export_mobile(graph, fmt, output, image_dir, calibration_dir, eval_paths, eval_labels) -> QuantizeReport:
    """Phone formats are checked on --image_dir (with accuracy), else --calibration_dir, else the sample photos."""
    from retrain.data import printable
    from retrain.mobile import export_mobile

    if image_dir:
        note = f"--image_dir {printable(str(image_dir))} (labelled)"
    else:
        if not calibration_dir:
            from retrain.sample_data import sample_image_dir

            calibration_dir = sample_image_dir()
        eval_paths, eval_labels = _folder_images(calibration_dir, "--calibration_dir"), None
        note = f"{printable(str(calibration_dir))} (unlabelled: agreement with the ONNX model only)"
    return export_mobile(graph, fmt, output, eval_paths=eval_paths, eval_labels=eval_labels, check_note=note)


def _check_format(to: str) -> str:
    if to in MOBILE_FORMATS:
        return to
    if to in EXPORT_FORMATS:
        return {"onnx": "float32", "onnx-int8": "int8", "onnx-fp16": "fp16"}[to]
    key = to.lower().replace("_", "").replace("-", "").replace(".", "")
    for name, why in NOT_OFFERED.items():
        if key.startswith(name) or (len(key) > 2 and name.startswith(key)):
            raise RetrainError(f"--to {to!r} is not offered: {why}. Formats: {', '.join(EXPORT_FORMATS)}")
    close = difflib.get_close_matches(to, list(EXPORT_FORMATS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RetrainError(
        f"--to {to!r} is not a known format; expected one of {', '.join(EXPORT_FORMATS)}{hint}"
    )


def _labelled_images(graph: Path, image_dir) -> tuple[list[str], list[int], list[list[str]]]:
    """Images under ``image_dir`` with the index of their class among the model's labels."""
    from retrain.data import discover, printable
    from retrain.predict import load

    labels = load(graph).labels
    dataset = discover(image_dir)
    unknown = [name for name in dataset.labels if name not in labels]
    if unknown:
        raise RetrainError(
            f"--image_dir {printable(str(image_dir))!r} has class folder(s) the model does not know: "
            f"{', '.join(map(repr, unknown[:5]))}{', ...' if len(unknown) > 5 else ''}. The model's labels are "
            f"{', '.join(map(repr, labels[:10]))}{', ...' if len(labels) > 10 else ''}; pass a folder whose "
            "sub-folders are named like them, or use --calibration_dir for unlabelled photos."
        )
    index = [labels.index(name) for name in dataset.labels]
    paths = [r.path for r in dataset.records]
    y = [index[r.label_index] for r in dataset.records]
    by_class: list[list[str]] = [[] for _ in dataset.labels]
    for r in dataset.records:
        by_class[r.label_index].append(r.path)
    return paths, y, by_class


def _folder_images(folder, flag: str) -> list[str]:
    from retrain.predict import expand_image_paths

    if not os.path.isdir(folder):
        raise RetrainError(f"{flag} {str(folder)!r} is not a folder; pass a folder of photos")
    paths = expand_image_paths([os.fspath(folder)])
    if not paths:
        raise RetrainError(f"{flag} {str(folder)!r} has no image files (.jpg, .png, ...) in it or below it")
    return paths
