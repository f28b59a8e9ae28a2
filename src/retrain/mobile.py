"""Phone and edge formats converted from the PyTorch modules: TFLite (LiteRT) float32 and int8, ExecuTorch
(XNNPACK) float32 and int8, Core ML, and a torch.export program (pt2). docs/deploy.md has the table.

    >>> from retrain.mobile import export_mobile
    >>> report = export_mobile("output_graph.onnx", "tflite", "model.tflite", eval_paths=[...])

The ONNX model is rebuilt as its PyTorch module (``retrain.torch_model``: the backbone's
architecture, every weight from the ONNX file, fine-tuned or not) and converted by
``litert-torch``, the PyTorch -> LiteRT converter (no TensorFlow). The file keeps the ONNX
model's contract (uint8 RGB NHWC ``image`` in, probabilities out, normalisation inside) and
carries the manifest in its metadata (``retrain.tflite``).

``tflite-int8`` is ai-edge-quantizer's dynamic-range recipe (``dynamic_wi8_afp32``): int8
weights, float activations, no calibration. Measured on the sample photos it kept top-1 on all
of them (max probability difference 0.07, 28% of the float size); PT2E static int8 was more
exact and faster at run time but took 7 minutes to calibrate on 128 photos here (docs/deploy.md).

Every file is checked before this returns: it is run with ai-edge-litert on real photos and
compared with the ONNX model. A float32 file that disagrees (max probability difference over
``FLOAT_TOLERANCE`` or any different top-1) is deleted and the export fails: never a silent
fallback. The comparison is printed, stored in the file's manifest and in ``<output>.check.json``.

``pt2`` is the same module as a ``torch.export`` program (``torch.export.save``; the manifest is the
archive's extra file ``retrain.manifest``), checked with ``torch.export.load``: for PyTorch, AOTInductor
and as the input of other on-device compilers. It needs nothing beyond retrain's own PyTorch.
``executorch`` is checked with the ExecuTorch runtime (the manifest is the constant method
``retrain_manifest``); ``coreml`` cannot run off Apple platforms, so it is read back and structure-checked
only, and the report says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from retrain.cache import atomic_write_bytes
from retrain.errors import RetrainError

log = logging.getLogger("retrain")

MOBILE_FORMATS = {
    "tflite": "float32 TFLite (LiteRT) for Android/iOS, converted from PyTorch by litert-torch; needs retrain[tflite]",
    "tflite-int8": "TFLite with int8 weights (ai-edge-quantizer dynamic range), about 28% of the size; "
    "needs retrain[tflite]",
    "pt2": "torch.export program (.pt2) for PyTorch / AOTInductor, checked with torch.export.load; no extra",
    "executorch": "ExecuTorch program (.pte, XNNPACK) for Android/iOS/embedded, float32, checked with the "
    "ExecuTorch runtime; needs retrain[executorch]",
    "executorch-int8": "ExecuTorch XNNPACK program with int8 weights and activations (PT2E static quantization, "
    "calibrated on the check photos); needs retrain[executorch]",
    "coreml": "Core ML ML Program (.mlpackage, float16) for iOS/macOS, converted here on Linux and structure-checked "
    "only (Core ML runs on Apple platforms); needs retrain[coreml]",
}
# What each format imports, and the pip command that provides it.
_NEEDS = {
    "tflite": (
        ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
        "pip install -c constraints/ci.txt 'retrain[tflite]' (litert-torch, ai-edge-litert, ai-edge-quantizer)",
    ),
    "pt2": ((), ""),
    "executorch": (
        ("executorch",),
        "pip install -c constraints/ci.txt 'retrain[executorch]' (executorch, with torchao; keeps torch 2.13)",
    ),
    "coreml": (("coremltools",), "pip install -c constraints/ci.txt 'retrain[coreml]' (coremltools)"),
}
FLOAT_FORMATS = ("tflite", "pt2", "executorch")  # must match the ONNX model to FLOAT_TOLERANCE
FLOAT_TOLERANCE = 1e-4  # largest probability difference a float32 conversion may show
# Largest unknown_score difference of a float32 conversion: the score's squared distance is expanded as
# |z|^2 - 2 z.m + |m|^2, so float32 rounding alone moves it by about 1e-2 (ONNX Runtime's own score is
# 8e-3 from a float64 evaluation on a test model); thresholds sit at about 1.
UNKNOWN_TOLERANCE = 5e-2
UNKNOWN_NAME = "unknown_score"


class MissingExtraError(RetrainError):
    """An optional converter is not installed."""


def require(fmt: str) -> None:
    """MissingExtraError naming the pip command if ``fmt``'s converter is not installed."""
    modules, install = _NEEDS[fmt.split("-")[0]]
    missing = missing_modules(modules)
    if missing:
        raise MissingExtraError(
            f"--to {fmt} needs the optional converter ({', '.join(missing)} not installed): {install}"
        )


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The ones of ``modules`` that cannot be imported here (found without importing them: seconds each)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def tflite_available() -> bool:
    return not missing_modules(_NEEDS["tflite"][0])


@contextlib.contextmanager
def _quiet_converter():
    """litert-torch prints progress bars, XLA/absl log lines and warnings that mean nothing to a user."""
    import warnings

    from retrain.tflite import quiet_native_output

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings(), quiet_native_output():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _named_output(module, name: str):
    """``module`` with a dict output named like the ONNX model's: ``name`` (probabilities) and, where the
    model has one, ``unknown_score``; so the converted signature's outputs carry the same names."""
    import torch

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, image):
            return self.model.outputs(image, name)

    return Named().eval()


def tflite_bytes(module, input_size: int, *, int8: bool = False, output_name: str = "final_result") -> bytes:
    """Convert the eval-mode ``module`` (uint8 NHWC ``image`` -> probabilities) to a TFLite flatbuffer."""
    import torch

    with _quiet_converter():
        import litert_torch

        litert_torch.config.show_progress = False
        sample = torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8)
        data = litert_torch.convert(
            _named_output(module, output_name), sample_kwargs={"image": sample}
        ).model_content()
        if int8:
            from ai_edge_quantizer import quantizer, recipe

            q = quantizer.Quantizer(data)
            q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
            data = bytes(q.quantize().quantized_model)
    return bytes(data)


class _Written:
    """A converted file: ``write(manifest)`` (re)writes it with that manifest; ``runner()`` loads it for the
    check (an object with ``predict_proba``), or None where no runtime exists here (Core ML on Linux)."""

    def __init__(self, write, runner, checked_with: str):
        self.write, self.runner, self.checked_with = write, runner, checked_with


def _tflite(module, input_size: int, fmt: str, output: Path, manifest: dict) -> _Written:
    from retrain.predict import load
    from retrain.tflite import with_manifest

    data = tflite_bytes(module, input_size, int8=fmt == "tflite-int8", output_name=manifest["output"]["name"])
    if fmt == "tflite-int8":
        manifest["quantization"] = "int8"
        manifest["quantization_details"] = {
            "method": "ai-edge-quantizer dynamic_wi8_afp32: int8 weights, float32 activations, no calibration"
        }
    return _Written(
        lambda m: atomic_write_bytes(output, with_manifest(data, m)), lambda: load(output), "ai-edge-litert"
    )


class _ProgramRunner:
    """Runs a callable (uint8 NHWC tensor -> the outputs by name, or in the order probabilities, unknown score)
    like a Classifier: ``predict_proba`` and ``predict``."""

    def __init__(self, fn, name: str = "final_result"):
        self.fn, self.name = fn, name

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.no_grad():
            out = self.fn(torch.from_numpy(np.ascontiguousarray(pixels, np.uint8)))
        if isinstance(out, dict):
            out = [out[self.name], *([out[UNKNOWN_NAME]] if UNKNOWN_NAME in out else [])]
        elif not isinstance(out, list | tuple):
            out = [out]
        arrays = [np.asarray(o, np.float32) for o in out]
        return arrays[0], (arrays[1] if len(arrays) > 1 else None)

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        return self.predict(pixels)[0]


def pt2_program(module, input_size: int, output_name: str = "final_result"):
    """``module`` as a torch.export program with a dynamic batch: uint8 (N, S, S, 3) -> its outputs by name."""
    import torch

    sample = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.export.export(
            _named_output(module, output_name), (sample,), dynamic_shapes=({0: batch},)
        )


def read_pt2_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a ``.pt2`` written by ``retrain export --to pt2`` (without loading the program)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith(f"/extra/{PT2_MANIFEST}")), None)
        if name is None:
            raise RetrainError(f"{os.fspath(path)!r} has no {PT2_MANIFEST!r}: it was not written by retrain")
        return json.loads(z.read(name).decode("utf-8"))


PT2_MANIFEST = "retrain.manifest"


def _pt2(module, input_size: int, output: Path, manifest: dict) -> _Written:
    import torch

    program = pt2_program(module, input_size, manifest["output"]["name"])

    def write(m: dict) -> None:
        tmp = output.with_name(f".{output.stem}.tmp-{os.getpid()}.pt2")  # torch warns on other suffixes
        torch.export.save(program, tmp, extra_files={PT2_MANIFEST: json.dumps(m, ensure_ascii=False)})
        os.replace(tmp, output)

    def runner():
        loaded = torch.export.load(output)
        return _ProgramRunner(loaded.module(), manifest["output"]["name"])

    return _Written(write, runner, "torch.export.load")


PTE_MANIFEST_METHOD = "retrain_manifest"  # a constant method of the .pte returning the manifest JSON
MAX_INT8_CALIBRATION = (
    64  # photos the ExecuTorch int8 ranges are observed on, evenly spread over the check set
)


def _tuple_outputs(module):
    """``module`` returning its outputs as a tuple (probabilities, then unknown_score where present):
    ExecuTorch and Core ML flatten outputs to a list anyway."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, image):
            return tuple(self.model.outputs(image).values())

    return Outputs().eval()


class _PteRunner:
    """Runs a .pte's ``forward`` with the ExecuTorch runtime, image by image (its input has batch 1)."""

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        from retrain.tflite import quiet_native_output

        with quiet_native_output():  # cpuinfo lines on every load
            program = Runtime.get().load_program(str(path))
            self.method = program.load_method("forward")

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        pixels = np.ascontiguousarray(pixels, np.uint8)
        runs = [self.method.execute([torch.from_numpy(pixels[i : i + 1])]) for i in range(len(pixels))]
        probs = np.concatenate([r[0].numpy() for r in runs]).astype(np.float32)
        unknown = (
            np.concatenate([r[1].numpy() for r in runs]).astype(np.float32) if len(runs[0]) > 1 else None
        )
        return probs, unknown

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        return self.predict(pixels)[0]


def read_pte_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a ``.pte`` written by ``retrain export --to executorch`` (needs the ExecuTorch runtime)."""
    from executorch.runtime import Runtime

    from retrain.tflite import quiet_native_output

    with quiet_native_output():
        program = Runtime.get().load_program(os.fspath(path))
    if PTE_MANIFEST_METHOD not in program.method_names:
        raise RetrainError(
            f"{os.fspath(path)!r} has no {PTE_MANIFEST_METHOD!r}: it was not written by retrain"
        )
    return json.loads(program.load_method(PTE_MANIFEST_METHOD).execute([])[0])


def _executorch(
    module, input_size: int, fmt: str, output: Path, manifest: dict, pixels: np.ndarray
) -> _Written:
    """Lower to XNNPACK (int8: PT2E static quantization observed on ``pixels`` first); batch 1."""
    import torch

    with _quiet_converter():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        sample = (torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8),)
        target = _tuple_outputs(module)
        if fmt == "executorch-int8":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            calibration = pixels[:: -(-len(pixels) // MAX_INT8_CALIBRATION)]
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            target = prepare_pt2e(torch.export.export(target, sample).module(), quantizer)
            with torch.no_grad():
                for i in range(len(calibration)):
                    target(torch.from_numpy(calibration[i : i + 1]))
            target = convert_pt2e(target)
            manifest["quantization"] = "int8"
            manifest["quantization_details"] = {
                "method": "PT2E static quantization (XNNPACKQuantizer, symmetric, per-channel weights)",
                "calibration_images": len(calibration),
            }
        program = torch.export.export(target, sample)

    def write(m: dict) -> None:
        with _quiet_converter():
            lowered = to_edge_transform_and_lower(
                program,
                partitioner=[XnnpackPartitioner()],
                constant_methods={PTE_MANIFEST_METHOD: json.dumps(m, ensure_ascii=False)},
            ).to_executorch()
        atomic_write_bytes(output, bytes(lowered.buffer))

    return _Written(write, lambda: _PteRunner(output), "the ExecuTorch runtime")


COREML_MANIFEST = "retrain.manifest"  # key in the model's user-defined metadata
COREML_UNCHECKED = (
    "structure-checked only: Core ML models run only on Apple platforms, so no prediction was compared here "
    "(inputs, outputs and metadata were read back with coremltools)"
)


def _coreml_module(module):
    """(1, 3, S, S) float RGB 0..255 (what a Core ML ImageType gives) -> (probabilities, [unknown_score])."""
    import torch

    class FromImage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, image):
            norm = self.model.features.normalize
            features = self.model.features.net((image - norm.mean) / norm.std)
            logits = self.model.head(features)
            out = [torch.softmax(logits, dim=1)]
            if self.model.unknown is not None:
                out.append(self.model.unknown(features, logits))
            return tuple(out)

    return FromImage().eval()


def _coreml(module, input_size: int, output: Path, manifest: dict) -> _Written:
    """An ML Program with an RGB ImageType input named ``image`` (normalisation inside), float16 compute."""
    import shutil

    import torch

    if output.suffix != ".mlpackage":
        raise RetrainError(
            f"--to coreml writes an .mlpackage folder: name --output like model.mlpackage, not {output.name!r}"
        )
    names = [manifest["output"]["name"], *([UNKNOWN_NAME] if module.unknown is not None else [])]
    with _quiet_converter():
        import coremltools as ct

        with torch.no_grad():
            traced = torch.jit.trace(_coreml_module(module), torch.zeros(1, 3, input_size, input_size))
        mlmodel = ct.convert(
            traced,
            inputs=[
                ct.ImageType(
                    name="image", shape=(1, 3, input_size, input_size), color_layout=ct.colorlayout.RGB
                )
            ],
            outputs=[ct.TensorType(name=n) for n in names],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS15,
        )

    def write(m: dict) -> None:
        mlmodel.user_defined_metadata[COREML_MANIFEST] = json.dumps(m, ensure_ascii=False)
        mlmodel.short_description = f"retrain: {len(m['labels'])} classes on {m['backbone']['name']}"
        staging = output.with_name(f".{output.stem}.staging-{os.getpid()}.mlpackage")
        shutil.rmtree(staging, ignore_errors=True)
        with _quiet_converter():
            mlmodel.save(str(staging))
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(staging, output)

    return _Written(write, None, "coremltools (structure only)")


def check_coreml(path: Path, input_size: int, outputs: Sequence[str], manifest: dict) -> None:
    """Read the .mlpackage back (without loading it for prediction, impossible off Apple platforms)."""
    import coremltools as ct

    with _quiet_converter():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    inputs = [(i.name, i.type.WhichOneof("Type")) for i in spec.description.input]
    image = spec.description.input[0].type.imageType if inputs else None
    problems = []
    if inputs != [("image", "imageType")] or (image.width, image.height) != (input_size, input_size):
        problems.append(f"inputs {inputs}")
    if [o.name for o in spec.description.output] != list(outputs):
        problems.append(f"outputs {[o.name for o in spec.description.output]}")
    stored = spec.description.metadata.userDefined.get(COREML_MANIFEST)
    if stored is None or json.loads(stored)["labels"] != manifest["labels"]:
        problems.append("no manifest with the model's labels")
    if problems:
        raise RetrainError(
            f"the converted Core ML model is not as expected ({'; '.join(problems)}); please report this"
        )


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def export_mobile(
    graph: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike,
    *,
    eval_paths: Sequence[str] = (),
    eval_labels: Sequence[int] | None = None,
    check_note: str = "",
):
    """Convert the float ONNX model ``graph`` to ``fmt`` at ``output``, run it on ``eval_paths`` and compare.

    ``eval_labels`` (indices into the model's labels, or None for unlabelled photos) adds the
    accuracy of both models. Returns a :class:`retrain.quantize.QuantizeReport`.
    """
    from retrain.predict import load
    from retrain.quantize import QuantizeReport, compare, load_pixels
    from retrain.torch_model import torch_classifier

    if fmt not in MOBILE_FORMATS:
        raise RetrainError(f"unknown phone format {fmt!r}; expected one of {', '.join(MOBILE_FORMATS)}")
    require(fmt)
    if not eval_paths:
        raise RetrainError(
            f"--to {fmt} is checked against the ONNX model on photos: none were given or found"
        )
    t0 = time.perf_counter()
    graph, output = Path(graph), Path(output)
    float_clf = load(graph)
    module, manifest = torch_classifier(graph)
    log.info("Converting %s to %s ...", graph, fmt)
    manifest = {**manifest, "runtime": fmt.split("-")[0], "converter": _converter_versions(fmt)}
    pixels, kept = load_pixels(float_clf, list(eval_paths))
    if not len(pixels):
        raise RetrainError(f"none of the {len(eval_paths)} photo(s) to check the {fmt} file on could be read")
    if fmt.startswith("tflite"):
        written = _tflite(module, float_clf.input_size, fmt, output, manifest)
    elif fmt == "coreml":
        written = _coreml(module, float_clf.input_size, output, manifest)
    elif fmt.startswith("executorch"):
        written = _executorch(module, float_clf.input_size, fmt, output, manifest, pixels)
    else:
        written = _pt2(module, float_clf.input_size, output, manifest)
    written.write(manifest)
    if written.runner is None:
        return _structure_only(written, output, fmt, float_clf, module, manifest, check_note, t0)
    # A multi-label model has no one right answer per folder: compare the two models' outputs only.
    single = eval_labels is not None and not float_clf.multi_label
    labels = np.asarray([eval_labels[i] for i in kept], np.int64) if single else None
    runner = written.runner()
    comparison = compare(float_clf, runner, pixels, labels)
    unknown_diff = _unknown_diff(float_clf, runner, pixels)
    report = QuantizeReport(
        format=fmt,
        path=output,
        size_bytes=0,
        float_size_bytes=float_clf.path.stat().st_size,
        seconds=0.0,
        comparison=comparison,
    )
    if fmt in FLOAT_FORMATS and (
        comparison.max_prob_diff > FLOAT_TOLERANCE
        or comparison.agreement < 1.0
        or (unknown_diff is not None and unknown_diff > UNKNOWN_TOLERANCE)
    ):
        output.unlink()
        raise RetrainError(
            f"the converted {fmt} file does not match the ONNX model (max probability difference "
            f"{comparison.max_prob_diff:.2g}, same top-1 on {100 * comparison.agreement:.1f}% of {comparison.count} "
            f"photos, unknown_score difference {unknown_diff}), so it was not kept. Please report this with the model's backbone name."
        )
    manifest["check"] = {
        **asdict(comparison),
        "accuracy_change": comparison.accuracy_change,
        "photos": check_note,
        "checked_with": written.checked_with,
        "unknown_score_max_diff": unknown_diff,  # None: the model has no unknown_score output
    }
    written.write(manifest)
    report.size_bytes = output.stat().st_size
    skipped = len(eval_paths) - len(kept)
    if skipped:
        report.notes.append(f"{skipped} check photo(s) could not be read and were left out")
    report.seconds = time.perf_counter() - t0
    check_path = output.with_suffix(".check.json")
    atomic_write_bytes(check_path, json.dumps({**report.to_dict(), "photos": check_note}, indent=2).encode())
    if unknown_diff is not None:
        report.notes.append(f"unknown_score kept: max difference from the ONNX model's {unknown_diff:.2g}")
    report.notes.append(
        f"checked with {written.checked_with} against the ONNX model; details in {check_path}"
    )
    return report


def _structure_only(written, output: Path, fmt, float_clf, module, manifest, check_note, t0):
    """Core ML: no runtime here; the file is read back and its structure checked, and the report says so."""
    from retrain.quantize import QuantizeReport

    outputs = [manifest["output"]["name"], *([UNKNOWN_NAME] if module.unknown is not None else [])]
    try:
        check_coreml(output, float_clf.input_size, outputs, manifest)
    except RetrainError:
        import shutil

        shutil.rmtree(output, ignore_errors=True)
        raise
    manifest["check"] = {"structure_only": True, "why": COREML_UNCHECKED, "outputs": outputs}
    written.write(manifest)
    report = QuantizeReport(
        format=fmt,
        path=output,
        size_bytes=_size(output),
        float_size_bytes=float_clf.path.stat().st_size,
        seconds=time.perf_counter() - t0,
        unchecked=COREML_UNCHECKED,
    )
    check_path = output.with_suffix(".check.json")
    atomic_write_bytes(check_path, json.dumps({**report.to_dict(), "photos": check_note}, indent=2).encode())
    report.notes.append(f"details in {check_path}")
    return report


def _unknown_diff(float_clf, runner, pixels: np.ndarray, batch_size: int = 32) -> float | None:
    """Largest |unknown_score| difference between the ONNX model and the converted file (None without one)."""
    if not float_clf.has_unknown:
        return None
    a, b = [], []
    for i in range(0, len(pixels), batch_size):
        a.append(float_clf.predict(pixels[i : i + batch_size])[1])
        got = runner.predict(pixels[i : i + batch_size])[1]
        if got is None:
            raise RetrainError("the converted file lost the model's unknown_score output; please report this")
        b.append(got)
    return float(np.abs(np.concatenate(a) - np.concatenate(b)).max())


def _converter_versions(fmt: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    dists = {
        "tflite": ("litert-torch", "ai-edge-litert", "ai-edge-quantizer"),
        "executorch": ("executorch", "torchao"),
    }.get(fmt.split("-")[0], ())
    for dist in (*dists, "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
