"""Distortions: retrain.py's semantics, training images only, variants cached and reused."""

from __future__ import annotations

import re

import numpy as np
import pytest

import retrain
import retrain.distort as distort
from conftest import TINY
from retrain.backbones import get_backbone
from retrain.distort import Distortions, Draws, apply, choose_copies, draw, variant_draws
from retrain.errors import RetrainError


@pytest.fixture
def fast_config(fast_config):
    """--final_fit train+val: the test images never reach the layer (the default folds them in, distorted too,
    after the test accuracy is printed), so the runs here can check that test images are never distorted."""
    return {**fast_config, "final_fit": "train+val"}


def _draws(n=1, *, zoom=1.0, ox=0.0, oy=0.0, flip=False, brightness=1.0) -> Draws:
    full = np.full
    return Draws(full(n, zoom), full(n, ox), full(n, oy), full(n, flip, bool), full(n, brightness))


def _coordinate_image(size: int) -> np.ndarray:
    """Red = k * x, green = k * y: a pixel's value tells where it came from."""
    yy, xx = np.mgrid[0:size, 0:size]
    k = 255 // (size - 1)
    img = np.stack([k * xx, k * yy, np.full_like(xx, 77)], axis=-1)
    return img.astype(np.uint8)[None]  # (1, size, size, 3)


def test_no_distortion_is_the_identity():
    px = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    d = Distortions(flip_left_right=True, random_brightness=10)
    assert np.array_equal(apply(px, d, _draws(3), 32), px)


def test_flip_mirrors_left_and_right():
    px = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = apply(px, Distortions(flip_left_right=True), _draws(2, flip=True), 32)
    assert np.array_equal(out, px[:, :, ::-1])
    # with a crop too, the cropped window is mirrored (crop first, then flip, as in retrain.py)
    src = _coordinate_image(48)
    d = Distortions(flip_left_right=True, random_crop=50)
    plain = apply(src, d, _draws(1, ox=0.25), 32)
    flipped = apply(src, d, _draws(1, ox=0.25, flip=True), 32)
    assert np.array_equal(flipped, plain[:, :, ::-1])


@pytest.mark.parametrize("ox, oy", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.25)])
def test_crop_cuts_a_window_of_the_margin_scaled_image(ox, oy):
    # random_crop 50: margin 1.5, so a 32 px window out of the image resized to 48 px, whose top-left
    # corner lies anywhere in the 16 px margin.
    src = _coordinate_image(48)
    out = apply(src, Distortions(random_crop=50), _draws(1, ox=ox, oy=oy), 32)[0]
    x0, y0 = round(16 * ox), round(16 * oy)
    if ox in (0.0, 1.0):  # whole-pixel offsets: exactly the source pixels
        assert np.array_equal(out, src[0, y0 : y0 + 32, x0 : x0 + 32])
    else:
        assert np.abs(out.astype(int) - src[0, y0 : y0 + 32, x0 : x0 + 32]).max() <= 3


def test_scale_zooms_in_by_the_drawn_factor():
    # random_scale 100: zoom in [1, 2]. Zoom 2 shows half the width of the (source) image.
    d = Distortions(random_scale=100)
    assert d.source_size(32) == 64
    src = _coordinate_image(64)
    full = apply(src, d, _draws(1, zoom=1.0, ox=0.5), 32)[0, 16, :, 0].astype(int)
    half = apply(src, d, _draws(1, zoom=2.0, ox=0.5), 32)[0, 16, :, 0].astype(int)
    assert (full[-1] - full[0]) / (half[-1] - half[0]) == pytest.approx(2.0, rel=0.05)
    assert half.mean() == pytest.approx(full.mean(), abs=3)  # centred window


def test_brightness_multiplies_and_saturates():
    grey = np.full((3, 8, 8, 3), 100, np.uint8)
    out = apply(
        grey,
        Distortions(random_brightness=30),
        Draws(np.ones(3), np.zeros(3), np.zeros(3), np.zeros(3, bool), np.array([0.8, 1.2, 3.0])),
        8,
    )
    assert out[0].max() == out[0].min() == 80
    assert out[1].max() == out[1].min() == 120
    assert out[2].min() == 255


def test_draws_follow_retrain_py_ranges():
    d = Distortions(flip_left_right=True, random_crop=10, random_scale=20, random_brightness=30)
    r = draw(d, np.random.default_rng(0), 20_000)
    assert 1.0 <= r.zoom.min() and r.zoom.max() <= 1.2 and r.zoom.mean() == pytest.approx(1.1, abs=0.005)
    assert 0.7 <= r.brightness.min() and r.brightness.max() <= 1.3
    assert r.brightness.mean() == pytest.approx(1.0, abs=0.01)
    assert 0 <= r.offset_x.min() and r.offset_x.max() <= 1
    assert r.flip.mean() == pytest.approx(0.5, abs=0.02)
    assert not draw(Distortions(random_crop=5), np.random.default_rng(0), 100).flip.any()
    assert d.source_size(224) == 296  # ceil(224 * 1.1 * 1.2)


def test_variant_draws_are_a_function_of_content_settings_and_copy():
    d = Distortions(flip_left_right=True, random_scale=20)
    a = variant_draws(d, b"k" * 20, range(6))
    assert np.array_equal(a.zoom, variant_draws(d, b"k" * 20, range(6)).zoom)
    assert len(set(a.zoom.round(6))) == 6  # every copy differs
    assert not np.array_equal(a.zoom, variant_draws(d, b"j" * 20, range(6)).zoom)
    assert not np.array_equal(a.zoom, variant_draws(Distortions(random_scale=30), b"k" * 20, range(6)).zoom)
    assert list(a.flip[:2]) in ([True, False], [False, True])  # consecutive copies: one mirrored, one not
    assert np.array_equal(variant_draws(d, b"k" * 20, [3]).zoom, a.zoom[3:4])  # copy 3 alone is still copy 3


def test_automatic_copies_and_bad_values():
    assert choose_copies(0, 100, Distortions(flip_left_right=True)) == 2
    assert choose_copies(0, 100, Distortions(random_crop=10)) == 10
    assert choose_copies(0, 2_000, Distortions(random_crop=10)) == 5
    assert choose_copies(0, 1_000_000, Distortions(random_crop=10)) == 2
    assert choose_copies(7, 100, Distortions(random_crop=10)) == 7
    with pytest.raises(RetrainError, match="distorted_copies must be >= 0"):
        choose_copies(-1, 100, Distortions(random_crop=10))
    with pytest.raises(RetrainError, match=r"--random_crop must be a percentage >= 0, got -5"):
        Distortions(random_crop=-5)
    with pytest.raises(RetrainError, match="random_brightness must be at most 100"):
        Distortions(random_brightness=150)


class _Spy:
    """Records which files the distortion code decodes and how many variants it makes."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        self.variants = 0
        real_read, real_apply = distort.read_image_bytes, distort.apply

        def read(path, *a, **k):
            self.paths.append(str(path))
            return real_read(path, *a, **k)

        def counting_apply(pixels, *a, **k):
            self.variants += len(pixels)
            return real_apply(pixels, *a, **k)

        monkeypatch.setattr(distort, "read_image_bytes", read)
        monkeypatch.setattr(distort, "apply", counting_apply)


def test_training_images_only_and_variants_cached(colour_dir, fast_config, monkeypatch, tmp_path):
    spy = _Spy(monkeypatch)
    flags = dict(
        flip_left_right=True, random_crop=10, random_scale=10, random_brightness=10, distorted_copies=3
    )
    plain = retrain.train(colour_dir, **{**fast_config, "output_dir": str(tmp_path / "plain")})
    assert spy.paths == [] and spy.variants == 0
    first = retrain.train(colour_dir, **fast_config, **flags)
    # The images the final layer learns from (training + validation) are distorted; test images never.
    n_train = first.metrics["final_fit_count"]
    assert first.metrics["final_fit"] == "train+val" and spy.variants == 3 * n_train
    # Only the files the layer learns from were read by the distortion code: test images stay untouched,
    # and their accuracy is measured on the same (undistorted) features as in the plain run.
    from retrain.data import TESTING, assign_splits, discover

    ds = assign_splits(discover(colour_dir), validation_percentage=10, testing_percentage=10)
    train_paths = {r.path for r in ds.records if r.split != TESTING}
    assert set(spy.paths) == train_paths and len(train_paths) == n_train
    assert first.test_count == plain.test_count

    spy.paths.clear()
    spy.variants = 0
    again = retrain.train(colour_dir, **{**fast_config, "output_dir": str(tmp_path / "again")}, **flags)
    assert spy.variants == 0  # every variant came from the cache
    assert again.test_accuracy == first.test_accuracy
    more = retrain.train(
        colour_dir,
        **{**fast_config, "output_dir": str(tmp_path / "more")},
        **{**flags, "distorted_copies": 5},
    )
    assert spy.variants == 2 * n_train  # copies 0-2 reused, 3-4 new
    assert more.test_accuracy is not None
    retrain.train(
        colour_dir, **{**fast_config, "output_dir": str(tmp_path / "other")}, **{**flags, "random_crop": 20}
    )
    assert spy.variants == 2 * n_train + 3 * n_train  # other settings, other variants


def test_distorted_training_still_learns(colour_dir, fast_config, caplog):
    caplog.set_level("INFO", logger="retrain")
    result = retrain.train(
        colour_dir, **fast_config, flip_left_right=True, random_crop=20, random_brightness=20
    )
    assert result.test_accuracy == 1.0
    # ... and what it learnt from were distorted variants of every training image, through the stand-in.
    found = re.search(
        r"Distortions \(flip, crop 20%, brightness 20%\): (\d+) variants of each of (\d+) training "
        r"images; (\d+) computed",
        caplog.text,
    )
    assert found, caplog.text
    copies, n_train, computed = map(int, found.groups())
    assert n_train == result.metrics["final_fit_count"] and copies >= 2 and computed == copies * n_train
    store = distort.variant_store(get_backbone(TINY), fast_config["bottleneck_dir"])
    store.refresh()
    assert len(store) == copies * n_train
    assert retrain.load(result.output_graph).manifest["backbone"]["name"] == TINY
