"""Phone formats: the PyTorch module rebuilt from an ONNX model, TFLite export and reading .tflite files.

The conversions need the optional extra ``retrain[tflite]`` (litert-torch, ai-edge-litert,
ai-edge-quantizer; about 0.8 GB with JAX and transformers). Without it those tests are skipped
with that reason; what works without it (the rebuilt module, the one-line errors) always runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import retrain
from conftest import SAMPLE_PHOTOS
from retrain.cli import label_image_main, retrain_main
from retrain.convert import export_model
from retrain.errors import ModelFileError
from retrain.mobile import missing_modules, tflite_available
from retrain.predict import expand_image_paths
from retrain.quantize import load_pixels
from trained_models import sample_model, sample_photo

needs_tflite = pytest.mark.skipif(
    not tflite_available(),
    reason="optional extra not installed: pip install -c constraints/ci.txt 'retrain[tflite]' (litert-torch, "
    "ai-edge-litert, ai-edge-quantizer)",
)


needs_executorch = pytest.mark.skipif(
    bool(missing_modules(["executorch"])),
    reason="optional extra not installed: pip install -c constraints/ci.txt 'retrain[executorch]'",
)
needs_coreml = pytest.mark.skipif(
    bool(missing_modules(["coremltools"])),
    reason="optional extra not installed: pip install -c constraints/ci.txt 'retrain[coreml]'",
)


def _torch_probs(module, pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(pixels)).numpy()


@pytest.fixture
def tiny_model(colour_dir, fast_config):
    return retrain.train(str(colour_dir), **fast_config)


def test_rebuilt_module_matches_the_onnx_model(tiny_model, colour_dir):
    from retrain.torch_model import torch_classifier

    module, manifest = torch_classifier(tiny_model.output_graph)
    clf = retrain.load(tiny_model.output_graph)
    pixels, _ = load_pixels(clf, expand_image_paths([str(colour_dir)]))
    assert manifest["labels"] == clf.labels
    assert np.abs(_torch_probs(module, pixels) - clf.predict_proba(pixels)).max() < 1e-5


def test_rebuilt_module_takes_every_weight_from_the_onnx_file(tmp_path_factory, tmp_path):
    """A changed convolution in the ONNX file (as fine-tuning changes them) shows up in the rebuilt module:
    EfficientNet-Lite0's BatchNorms are folded like the exporter folded them, and weights map in order."""
    from retrain.torch_model import torch_classifier

    run = sample_model(tmp_path_factory)
    model = onnx.load(str(run.output_graph))
    conv = [n for n in model.graph.node if n.op_type == "Conv"][20]
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    import torch

    module, _ = torch_classifier(changed)
    before, _ = torch_classifier(run.output_graph)
    edited = retrain.load(changed)
    paths = [str(sample_photo(label, i)) for label in ("animals", "fish", "tools") for i in range(2)]
    pixels, _ = load_pixels(edited, paths)
    with torch.no_grad():
        x = torch.from_numpy(pixels)
        moved = (module.features(x) - before.features(x)).abs().max().item()
    assert moved > 1e-2  # the edit reached the rebuilt backbone...
    want = edited.predict_proba(pixels)
    assert np.abs(_torch_probs(module, pixels) - want).max() < 1e-5  # ...exactly as ONNX Runtime runs it


def test_quantized_onnx_is_refused_with_the_file_to_use(tmp_path_factory):
    from retrain.torch_model import torch_classifier

    run = sample_model(tmp_path_factory, quantize="int8")
    with pytest.raises(
        ModelFileError, match="is the int8 model; phone formats are converted from the float32"
    ):
        torch_classifier(run.output_graph.with_name("output_graph.int8.onnx"))


def test_missing_extra_is_one_line_and_exit_2(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("retrain.mobile.missing_modules", lambda modules: list(modules))
    code = retrain_main(
        [
            "export",
            "--graph",
            str(tiny_model.output_graph),
            "--to",
            "tflite-int8",
            "--output",
            str(tmp_path / "m.tflite"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert (
        "--to tflite-int8 needs the optional converter" in err
        and "pip install" in err
        and "retrain[tflite]" in err
    )
    assert not (tmp_path / "m.tflite").exists()


def test_reading_a_tflite_without_the_runtime_says_what_to_install(tmp_path):
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    code = (
        "import sys; sys.modules['ai_edge_litert'] = None; from retrain.cli import label_image_main; "
        f"sys.exit(label_image_main(['--graph', {str(fake)!r}, '--image', {str(sample_photo('fish'))!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "needs the LiteRT runtime: pip install 'ai-edge-litert" in proc.stderr


@pytest.mark.slow
@needs_tflite
def test_tflite_of_a_small_model_keeps_contract_metadata_and_outputs(
    tiny_model, colour_dir, tmp_path, capsys
):
    out = tmp_path / "tiny.tflite"
    assert (
        retrain_main(
            [
                "export",
                "--graph",
                str(tiny_model.output_graph),
                "--to",
                "tflite",
                "--output",
                str(out),
                "--image_dir",
                str(colour_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tflite model" in printed and "same top-1 as float on 100.0%" in printed
    clf, onnx_clf = retrain.load(out), retrain.load(tiny_model.output_graph)
    assert clf.labels == onnx_clf.labels and clf.manifest["runtime"] == "tflite"
    assert clf.manifest["preprocessing"] == onnx_clf.manifest["preprocessing"]
    assert clf.manifest["check"]["count"] == 36 and clf.manifest["check"]["max_prob_diff"] < 1e-5
    check = json.loads(out.with_suffix(".check.json").read_text())
    assert check["comparison"]["agreement"] == 1.0 and check["format"] == "tflite"

    from ai_edge_litert.interpreter import Interpreter

    sig = Interpreter(model_path=str(out)).get_signature_runner("serving_default")
    assert (
        list(sig.get_input_details()) == ["image"] and sig.get_input_details()["image"]["dtype"] == np.uint8
    )
    assert sorted(sig.get_output_details()) == ["final_result", "unknown_score"]  # as the ONNX model's
    assert clf.has_unknown and clf.manifest["check"]["unknown_score_max_diff"] < 0.05

    image = str(next((colour_dir / "green").glob("*.jpg")))
    assert label_image_main(["--graph", str(tiny_model.output_graph), "--image", image]) == 0
    from_onnx = capsys.readouterr().out
    assert label_image_main(["--graph", str(out), "--image", image]) == 0
    assert capsys.readouterr().out == from_onnx


@pytest.mark.slow
@needs_tflite
def test_tflite_bars_on_the_sample_photos(tmp_path_factory, tmp_path):
    """EfficientNet-Lite0: float32 TFLite agrees with ONNX on >= 99.5% of the held-out photos (the run's test and
    validation splits) and of all 143; int8 is at most 1/3 the size and at most 1 point less accurate on them."""
    from retrain.data import TRAINING, assign_splits, discover
    from retrain.quantize import compare

    run = sample_model(tmp_path_factory)
    dataset = assign_splits(discover(SAMPLE_PHOTOS))
    labels = retrain.load(run.output_graph).labels
    held_out = [r for r in dataset.records if r.split != TRAINING]
    y = np.asarray([labels.index(dataset.labels[r.label_index]) for r in held_out])
    fp32 = export_model(run.output_graph, "tflite", tmp_path / "m.tflite", image_dir=SAMPLE_PHOTOS)
    int8 = export_model(run.output_graph, "tflite-int8", tmp_path / "m.int8.tflite", image_dir=SAMPLE_PHOTOS)
    assert fp32.comparison.count == 143 and fp32.comparison.agreement >= 0.995
    assert int8.size_bytes <= fp32.size_bytes / 3 and int8.comparison.accuracy_change >= -1.0

    onnx_clf = retrain.load(run.output_graph)
    pixels, kept = load_pixels(onnx_clf, [r.path for r in held_out])
    assert len(kept) == len(held_out) >= 20
    on_fp32 = compare(onnx_clf, retrain.load(tmp_path / "m.tflite"), pixels, y)
    on_int8 = compare(onnx_clf, retrain.load(tmp_path / "m.int8.tflite"), pixels, y)
    assert on_fp32.agreement >= 0.995 and on_fp32.max_prob_diff < 1e-4
    assert (
        on_int8.accuracy_change >= -1.0
        and retrain.load(tmp_path / "m.int8.tflite").manifest["quantization"] == "int8"
    )


def test_pt2_keeps_the_manifest_and_matches_onnx(tiny_model, colour_dir, tmp_path, capsys):
    """torch.export needs no extra: the .pt2 carries the manifest and the check, and its program runs any batch
    and gives both of the ONNX model's outputs (probabilities and unknown_score)."""
    import torch

    from retrain.mobile import read_pt2_manifest

    out = tmp_path / "tiny.pt2"
    args = ["export", "--graph", str(tiny_model.output_graph), "--to", "pt2", "--output", str(out)]
    assert retrain_main([*args, "--image_dir", str(colour_dir)]) == 0
    printed = capsys.readouterr()
    assert "pt2 model" in printed.out and "checked with torch.export.load" in printed.err
    manifest = read_pt2_manifest(out)
    onnx_clf = retrain.load(tiny_model.output_graph)
    assert manifest["labels"] == onnx_clf.labels and manifest["runtime"] == "pt2"
    assert manifest["preprocessing"] == onnx_clf.manifest["preprocessing"]
    assert manifest["check"]["count"] == 36 and manifest["check"]["max_prob_diff"] < 1e-5
    pixels, _ = load_pixels(onnx_clf, expand_image_paths([str(colour_dir)]))
    program = torch.export.load(out).module()
    assert onnx_clf.has_unknown and manifest["check"]["unknown_score_max_diff"] < 0.05
    for n in (1, 3):
        with torch.no_grad():
            got = program(torch.from_numpy(pixels[:n]))  # the ONNX model's outputs, by the same names
        probs, unknown = onnx_clf.predict(pixels[:n])
        np.testing.assert_allclose(got["final_result"].numpy(), probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["unknown_score"].numpy(), unknown, atol=0.05, rtol=0)


@pytest.mark.parametrize("fmt, extra", [("executorch-int8", "executorch"), ("coreml", "coreml")])
def test_missing_executorch_or_coreml_is_one_line_and_exit_2(
    tiny_model, tmp_path, monkeypatch, capsys, fmt, extra
):
    monkeypatch.setattr("retrain.mobile.missing_modules", lambda modules: list(modules))
    out = tmp_path / "m.out"
    assert (
        retrain_main(["export", "--graph", str(tiny_model.output_graph), "--to", fmt, "--output", str(out)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err and f"--to {fmt} needs the optional converter" in err and f"retrain[{extra}]" in err
    )
    assert not out.exists()


@pytest.mark.slow
@needs_executorch
def test_executorch_fp32_matches_onnx_and_int8_runs(tiny_model, colour_dir, tmp_path):
    """The .pte runs in the ExecuTorch runtime: float32 like ONNX (both outputs), its manifest a constant method;
    int8 keeps top-1 on the colour photos."""
    from retrain.mobile import _PteRunner, read_pte_manifest

    fp32 = export_model(tiny_model.output_graph, "executorch", tmp_path / "m.pte", image_dir=colour_dir)
    int8 = export_model(tiny_model.output_graph, "executorch-int8", tmp_path / "m8.pte", image_dir=colour_dir)
    assert fp32.comparison.count == 36 and fp32.comparison.max_prob_diff < 1e-5
    assert int8.comparison.agreement == 1.0
    manifest = read_pte_manifest(tmp_path / "m.pte")
    onnx_clf = retrain.load(tiny_model.output_graph)
    assert (
        manifest["labels"] == onnx_clf.labels
        and manifest["check"]["checked_with"] == "the ExecuTorch runtime"
    )
    assert read_pte_manifest(tmp_path / "m8.pte")["quantization"] == "int8"
    pixels, _ = load_pixels(onnx_clf, expand_image_paths([str(colour_dir)]))
    probs, unknown = _PteRunner(tmp_path / "m.pte").predict(pixels[:4])
    want_probs, want_unknown = onnx_clf.predict(pixels[:4])
    np.testing.assert_allclose(probs, want_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(unknown, want_unknown, atol=0.05, rtol=0)


@pytest.mark.slow
@needs_coreml
def test_coreml_is_converted_and_says_it_is_structure_checked_only(tiny_model, colour_dir, tmp_path, capsys):
    import coremltools as ct

    out = tmp_path / "m.mlpackage"
    args = ["export", "--graph", str(tiny_model.output_graph), "--to", "coreml", "--output", str(out)]
    assert retrain_main([*args, "--image_dir", str(colour_dir)]) == 0
    assert "structure-checked only: Core ML models run only on Apple platforms" in capsys.readouterr().out
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["image"]
    assert spec.description.input[0].type.imageType.width == 32  # the tiny backbone's input size
    assert [o.name for o in spec.description.output] == ["final_result", "unknown_score"]
    manifest = json.loads(spec.description.metadata.userDefined["retrain.manifest"])
    assert manifest["labels"] == ["blue", "green", "red"] and manifest["check"]["structure_only"] is True
    assert retrain_main([*args[:-1], str(tmp_path / "m.mlmodel")]) == 2  # an .mlpackage is a folder
