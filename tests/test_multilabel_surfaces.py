"""A multi-label model behind `retrain serve` (JSON with the label set, /v1/model with the thresholds)
and behind `retrain ui`'s Try step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from multilabel_runs import multilabel_model
from retrain.predict import load
from retrain.serve import create_app


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return multilabel_model(tmp_path_factory)


def _photos(model) -> list[Path]:
    return sorted(Path(model.config.image_dir).rglob("*.jpg"))[:6]


def test_the_server_answers_with_the_label_set(model):
    clf = load(model.output_graph)
    photos = _photos(model)
    with TestClient(create_app(model.output_graph)) as client:
        info = client.get("/v1/model").json()
        assert info["kind"] == "multi_label" and info["output"]["kind"] == "independent_probabilities"
        assert info["thresholds"] == pytest.approx(clf.thresholds.tolist())
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        results = client.post("/v1/classify?top_k=1", files=files).json()["results"]
    assert len(results) == len(photos)
    for res, photo in zip(results, photos):
        (ranked,) = clf.classify([str(photo)])
        assert res["labels"] == ranked.labels  # exactly the Python API's set
        assert [p["label"] for p in res["predictions"]] == [p.label for p in ranked]  # every label
        assert "unknown" not in res and "unknown_score" not in res
        thresholds = dict(zip(info["labels"], info["thresholds"]))
        assert set(res["labels"]) == {
            p["label"] for p in res["predictions"] if p["score"] >= thresholds[p["label"]]
        }


def test_the_ui_try_step_gets_the_label_set(model, tmp_path):
    from retrain.ui import create_ui_app

    project = tmp_path / "project"
    app = create_ui_app(project)
    run = project / "runs" / "ml-run"
    run.mkdir(parents=True)
    shutil.copy(model.output_graph, run / "output_graph.onnx")
    clf = load(model.output_graph)
    with TestClient(app) as client:
        client.headers["X-CSRF-Token"] = app.state.ui.csrf
        for photo in _photos(model)[:3]:
            r = client.post(
                "/api/runs/ml-run/classify", files=[("file", (photo.name, photo.read_bytes(), "image/jpeg"))]
            ).json()
            (ranked,) = clf.classify([str(photo)])
            assert r["labels"] == ranked.labels
            assert r["thresholds"] == pytest.approx(dict(zip(clf.labels, clf.thresholds.tolist())))
