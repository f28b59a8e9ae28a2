"""The README's step-by-step Python example runs as written, on a small copy of the sample photos."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import retrain
from conftest import SAMPLE_PHOTOS

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow  # the real backbone, exported and fine-tuned: about 30 s
def test_readme_step_by_step_example_runs(tmp_path: Path, monkeypatch, capsys):
    (block,) = [b for b in _python_blocks() if "retrain.extract_features(" in b]
    for cls in ("animals", "tools"):  # the example's "flower_photos": 2 classes x 10 real photos
        (tmp_path / "flower_photos" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE_PHOTOS / cls).iterdir())[:10]:
            shutil.copy(f, tmp_path / "flower_photos" / cls / f.name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code

    out = capsys.readouterr().out
    assert "(16, 1280)" in out or re.search(r"\(\d+, 1280\)", out)
    splits, head, tuned = namespace["splits"], namespace["head"], namespace["tuned"]
    assert splits.labels == ["animals", "tools"]
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 20
    # What the example exported is the head it fitted (or the fine-tuned one), on the real backbone.
    clf = retrain.load(tmp_path / "flowers.onnx")
    assert clf.labels == ["animals", "tools"] and clf.manifest["fine_tuned"] == (
        tuned.backbone_onnx is not None
    )
    if tuned.backbone_onnx is None:
        pixels = np.stack([clf.to_pixels(p) for p in splits.test.paths])
        np.testing.assert_allclose(clf.predict_proba(pixels), head.predict_proba(splits.test.X), atol=1e-4)
    assert "Prediction(label=" in out
