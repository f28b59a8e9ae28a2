"""int8 / fp16 models: size, accuracy, parity with the float model on the sample photos, and every reader."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from starlette.testclient import TestClient

import retrain
from conftest import SAMPLE_PHOTOS
from retrain.convert import export_model
from retrain.data import TESTING, discover
from retrain.errors import RetrainError
from retrain.quantize import float_nodes, load_pixels
from retrain.runaudit import load_audit
from trained_models import sample_model, sample_photo


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """``retrain --quantize int8``: calibrated on training images, measured on the run's test split."""
    return sample_model(tmp_path_factory, quantize="int8")


@pytest.fixture(scope="module")
def fp16_path(int8_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "model.fp16.onnx"
    from retrain.cli import retrain_main

    assert (
        retrain_main(
            ["export", "--graph", str(int8_run.output_graph), "--to", "onnx-fp16", "--output", str(out)]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def sample_pixels(int8_run):
    """Every sample photo decoded for the model, its true label index and the float model's probabilities."""
    clf = retrain.load(int8_run.output_graph)
    dataset = discover(SAMPLE_PHOTOS)
    pixels, kept = load_pixels(clf, [r.path for r in dataset.records])
    assert len(kept) == len(dataset.records)
    y = np.array([clf.labels.index(dataset.labels[r.label_index]) for r in dataset.records])
    return pixels, y, clf.predict_proba(pixels)


def _float16_bytes(path) -> int:
    import onnx

    model = onnx.load(str(path))
    return sum(len(i.raw_data) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)


def _int8_path(run):
    return run.output_graph.with_name("output_graph.int8.onnx")


def test_int8_at_training_time_is_small_and_keeps_test_accuracy(int8_run):
    report = json.loads((int8_run.run_dir / "quantize_int8.json").read_text())
    float_size = int8_run.output_graph.stat().st_size
    int8_size = _int8_path(int8_run).stat().st_size
    assert report["size_bytes"] == int8_size and report["float_size_bytes"] == float_size
    # The unknown score's whitener (D x D float16, the same whatever the training set) stays float16 in
    # both files; everything else, backbone and new layer, is at most a third of its float size.
    block = _float16_bytes(int8_run.output_graph)
    assert block > 0 and _float16_bytes(_int8_path(int8_run)) == block
    assert int8_size - block <= (float_size - block) / 3, (int8_size, float_size, block)
    c = report["comparison"]
    assert c["count"] == int8_run.test_count >= 15
    # The float side is the exported model on the test images, which (--final_fit all) it also learned from.
    audit = load_audit(int8_run.run_dir / "audit.npz")  # the run's images, their labels and splits
    test = [i for i, split in enumerate(audit["split"]) if split == TESTING]
    ranked = retrain.load(int8_run.output_graph).classify([str(audit["paths"][i]) for i in test], top_k=1)
    exported = np.mean([row[0].label == audit["labels"][audit["y"][i]] for row, i in zip(ranked, test)])
    assert len(test) == c["count"]
    assert c["float_accuracy"] == pytest.approx(exported, abs=1e-9)
    assert int8_run.metrics["final_fit"] == "all"
    assert c["accuracy_change"] >= -1.0, c  # at most one point lost on the test split
    assert c["agreement"] == 1.0


def test_int8_manifest_and_graph(int8_run):
    clf = retrain.load(_int8_path(int8_run))
    float_clf = retrain.load(int8_run.output_graph)
    assert clf.manifest["quantization"] == "int8"
    assert clf.labels == float_clf.labels and clf.input_size == float_clf.input_size
    details = clf.manifest["quantization_details"]
    assert details["calibration_images"] >= 100 and details["comparison"]["count"] == int8_run.test_count
    model = onnx.load(str(_int8_path(int8_run)))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The input stays uint8 NHWC and the output float32 probabilities.
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_float_nodes_keep_the_input_side_and_the_new_layer(int8_run):
    model = onnx.load(str(int8_run.output_graph))
    names = set(float_nodes(model))
    kinds = {n.name: n.op_type for n in model.graph.node}
    assert {"final_retrain_ops/Wx_plus_b", "final_result"} <= names  # Gemm + Softmax
    assert kinds[model.graph.node[0].name] in ("Transpose", "Cast") and model.graph.node[0].name in names
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs[0] in names and convs[-1] not in names
    assert sum(c in names for c in convs) < len(convs) // 2


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_parity_with_the_float_model_on_the_sample_photos(fmt, int8_run, fp16_path, sample_pixels):
    pixels, y, a = sample_pixels
    path = _int8_path(int8_run) if fmt == "int8" else fp16_path
    if fmt == "fp16":  # fp16 runs slowly on CPUs; every other photo still covers each class
        pixels, y, a = pixels[::2], y[::2], a[::2]
    b = retrain.load(path).predict_proba(pixels)
    assert b.dtype == np.float32 and b.shape == a.shape
    agreement = (a.argmax(1) == b.argmax(1)).mean()
    max_diff = np.abs(a - b).max()
    assert agreement >= (0.99 if fmt == "int8" else 1.0), agreement
    assert max_diff <= (0.1 if fmt == "int8" else 0.01), max_diff
    assert (b.argmax(1) == y).mean() >= (a.argmax(1) == y).mean() - 0.01


def test_fp16_is_half_size_and_marked(int8_run, fp16_path):
    clf = retrain.load(fp16_path)
    assert clf.manifest["quantization"] == "fp16"
    # Everything but the unknown score's whitener (float16 in the float model already) halves.
    block = _float16_bytes(int8_run.output_graph)
    assert fp16_path.stat().st_size - block <= 0.55 * (int8_run.output_graph.stat().st_size - block)


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_label_image_reads_converted_models(fmt, int8_run, fp16_path, capsys):
    from retrain.cli import label_image_main

    path = _int8_path(int8_run) if fmt == "int8" else fp16_path
    photos = [sample_photo(label, 3) for label in ("animals", "fish", "landmarks", "tools")]
    assert (
        label_image_main(["--graph", str(path), "--json", "--top_k", "1", "--image", *map(str, photos)]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["predictions"][0]["label"] for r in rows] == ["animals", "fish", "landmarks", "tools"]


def test_serving_an_int8_model(int8_run):
    from retrain.serve import create_app

    with TestClient(create_app(_int8_path(int8_run))) as client:
        assert client.get("/v1/model").json()["quantization"] == "int8"
        r = client.post(
            "/v1/classify",
            content=sample_photo("fish", 2).read_bytes(),
            headers={"Content-Type": "image/jpeg"},
        )
        assert r.json()["results"][0]["predictions"][0]["label"] == "fish"


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """3 photos of 3 of the classes: a labelled folder need not have every class."""
    folder = tmp_path_factory.mktemp("small") / "photos"
    for label in ("animals", "fish", "tools"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            (folder / label / f"{i}.jpg").write_bytes(sample_photo(label, i).read_bytes())
    return folder


def test_export_int8_with_a_labelled_folder(int8_run, small_folder, tmp_path, capsys):
    from retrain.cli import retrain_main

    out = tmp_path / "exported.int8.onnx"
    code = retrain_main(
        [
            "export",
            "--graph",
            str(int8_run.output_graph),
            "--to",
            "onnx-int8",
            "--output",
            str(out),
            "--image_dir",
            str(small_folder),
            "--max_calibration_images",
            "6",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "int8 model" in printed and "image_dir accuracy" in printed and "N=9" in printed
    clf = retrain.load(out)
    assert clf.manifest["quantization_details"]["calibration_images"] == 6
    assert clf.manifest["quantization_details"]["comparison"]["count"] == 9
    assert clf.classify(str(sample_photo("tools", 5)), top_k=1)[0][0].label == "tools"


def test_export_plain_onnx_copy(int8_run, small_folder, tmp_path):
    report = export_model(int8_run.output_graph, "onnx", tmp_path / "copy.onnx", image_dir=small_folder)
    assert report.comparison.agreement == 1.0 and report.comparison.max_prob_diff == 0.0
    assert "quantization" not in retrain.load(tmp_path / "copy.onnx").manifest


def test_export_errors(int8_run, tmp_path):
    graph = int8_run.output_graph
    with pytest.raises(RetrainError, match="needs real photos to calibrate on: pass --image_dir"):
        export_model(graph, "onnx-int8", tmp_path / "x.onnx")
    with pytest.raises(
        RetrainError,
        match="'torchscript' is not offered: .*use --to pt2.*Formats: onnx, onnx-int8, onnx-fp16, tflite",
    ):
        export_model(graph, "torchscript", tmp_path / "x.pt")
    with pytest.raises(RetrainError, match="did you mean 'onnx-int8'"):
        export_model(graph, "onnx-int4", tmp_path / "x.onnx")
    with pytest.raises(RetrainError, match="is the --graph file itself"):
        export_model(graph, "onnx-fp16", graph)
    other = tmp_path / "other"
    for name in ("cats", "fish"):
        (other / name).mkdir(parents=True)
        (other / name / "a.jpg").write_bytes(sample_photo("fish").read_bytes())
    with pytest.raises(RetrainError, match="class folder\\(s\\) the model does not know: 'cats'"):
        export_model(graph, "onnx-fp16", tmp_path / "x.onnx", image_dir=other)
    with pytest.raises(RetrainError, match="--calibration_dir .* has no image files"):
        os.makedirs(tmp_path / "empty")
        export_model(graph, "onnx-int8", tmp_path / "x.onnx", calibration_dir=tmp_path / "empty")


def test_int8_calibration_uses_every_batch(int8_run, sample_pixels):
    """Four batches: ONNX Runtime's flushing option once threw them all away ("No data is collected")."""
    from retrain.export import get_manifest
    from retrain.quantize import quantize_int8

    pixels = sample_pixels[0]
    model = quantize_int8(
        onnx.load(str(int8_run.output_graph)), (pixels[i : i + 1] for i in range(0, 40, 10))
    )
    assert get_manifest(model)["quantization_details"]["calibration_images"] == 4
