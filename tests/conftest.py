"""Shared fixtures: generated image folders and a tiny stand-in backbone for fast pipeline tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.backbones import BackboneSpec, Preprocessing, available_backbones, register_backbone

SAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "src" / "retrain" / "sample_data" / "photos"
TINY = "tiny_test_backbone"


def _build_tiny():
    import torch
    from torch import nn

    from retrain.backbones import FeatureNet

    class Tiny(FeatureNet):
        """Colour statistics as features: enough to separate colour-coded classes."""

        def __init__(self):
            super().__init__()
            self.feature_dim = 16
            torch.manual_seed(0)
            self.blocks = nn.ModuleList([nn.Conv2d(3, 16, 3, stride=2), nn.ReLU6()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x.mean(dim=(2, 3))

    return Tiny().eval()


if TINY not in available_backbones():
    register_backbone(
        BackboneSpec(
            name=TINY,
            feature_dim=16,
            preprocessing=Preprocessing(input_size=32, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
            build=_build_tiny,
            description="test stand-in",
            weights_id="tiny-seed0",
        )
    )

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image_folder(
    root: Path, per_class: int = 12, classes=COLOURS, size: int = 48, seed: int = 0
) -> Path:
    """Noisy solid-colour JPEGs, one folder per class."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"img_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def colour_dir(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def fast_config(tmp_path: Path) -> dict:
    """Keyword overrides for retrain.train() that keep a pipeline test to a second or two."""
    return dict(
        architecture=TINY,
        bottleneck_dir=str(tmp_path / "bottlenecks"),
        model_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
        how_many_training_steps=200,
        eval_step_interval=50,
        seed=1,
        quiet=True,
    )


# Fixtures that train or serve a model on the real EfficientNet-Lite0 (tests/trained_models.py): a test
# using one needs the packaged backbone exported and run on the sample photos, so it is `slow`.
REAL_MODEL_FIXTURES = {
    "model",
    "client",
    "strict_client",
    "int8_run",
    "fp16_path",
    "sample_pixels",
    "sample_runs",
    "server",
    "browser",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache from tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    os.environ.pop("RETRAIN_DEBUG", None)


@pytest.fixture(autouse=True)
def _log_to_caplog():
    """An in-process retrain_main() points the "retrain" logger at stdout only; undo that around each test."""
    log = logging.getLogger("retrain")
    saved = log.handlers[:], log.propagate, log.level
    log.handlers[:], log.propagate = [], True
    yield
    log.handlers[:], log.propagate, log.level = saved
