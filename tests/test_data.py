from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import make_image_folder
from retrain.data import (
    TESTING,
    TRAINING,
    VALIDATION,
    assign_splits,
    discover,
    hash_percentage,
    which_split,
)
from retrain.errors import DatasetError


def _splits(ds):
    return {r.rel_path: r.split for r in ds.records}


def test_split_does_not_depend_on_where_the_dataset_lives(tmp_path: Path):
    a = make_image_folder(tmp_path / "a", per_class=30)
    b = tmp_path / "elsewhere" / "moved"
    shutil.copytree(a, b)
    sa = _splits(assign_splits(discover(a)))
    sb = _splits(assign_splits(discover(b)))
    assert sa == sb
    assert set(sa.values()) == {TRAINING, VALIDATION, TESTING}


def test_split_is_stable_when_images_are_added(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", per_class=30)
    before = _splits(assign_splits(discover(root)))
    make_image_folder(tmp_path / "extra", per_class=5)
    for f in (tmp_path / "extra" / "red").iterdir():
        shutil.copy(f, root / "red" / f"new_{f.name}")
    after = _splits(assign_splits(discover(root)))
    assert all(after[k] == v for k, v in before.items())


def test_nohash_groups_near_duplicates():
    names = [f"cls/leaf{i}_nohash_{j}.jpg" for i in range(40) for j in range(3)]
    for i in range(40):
        assert len({which_split(f"cls/leaf{i}_nohash_{j}.jpg", 10, 10) for j in range(3)}) == 1
    assert hash_percentage(names[0]) == hash_percentage("cls/leaf0")


def test_split_percentages_are_roughly_respected():
    splits = [which_split(f"c/img{i}.jpg", 10, 20) for i in range(5000)]
    assert 0.08 < splits.count(VALIDATION) / 5000 < 0.12
    assert 0.18 < splits.count(TESTING) / 5000 < 0.22


def test_labels_are_folder_names_exactly_and_sorted(tmp_path: Path):
    classes = {"Sun_Flowers": (200, 200, 0), "daisy x": (250, 250, 250), "Daisy X": (10, 10, 10), "rosé": (200, 0, 0)}
    ds = discover(make_image_folder(tmp_path / "d", per_class=3, classes=classes))
    assert ds.labels == sorted(classes)
    assert any("differ only in case" in n for n in ds.notices)


def test_nested_files_belong_to_their_top_class_and_extensions_ignore_case(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    nested = root / "red" / "deeper" / "more"
    nested.mkdir(parents=True)
    shutil.copy(root / "red" / "img_000.jpg", nested / "SHOUT.JPG")
    shutil.copy(root / "red" / "img_001.jpg", nested / "x.Jpeg")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "top.jpg").write_bytes((root / "red" / "img_000.jpg").read_bytes())
    ds = discover(root)
    red = [r.rel_path for r in ds.records if ds.labels[r.label_index] == "red"]
    assert "red/deeper/more/SHOUT.JPG" in red and "red/deeper/more/x.Jpeg" in red
    assert any("top level" in n for n in ds.notices)
    assert any("without an image extension" in n for n in ds.notices)


def test_small_classes_get_validation_and_test_images(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", per_class=3, classes={"a": (0, 0, 0), "b": (255, 255, 255)})
    make_image_folder(root, per_class=2, classes={"c": (0, 0, 255)})
    make_image_folder(root, per_class=1, classes={"d": (0, 255, 0)})
    ds = assign_splits(discover(root))
    counts = ds.counts()
    for label in ("a", "b"):
        assert counts[label] == {TRAINING: 1, VALIDATION: 1, TESTING: 1}
    assert counts["c"] == {TRAINING: 2, VALIDATION: 0, TESTING: 0}
    assert counts["d"] == {TRAINING: 1, VALIDATION: 0, TESTING: 0}
    assert sum("only" in n and "not measured" in n for n in ds.notices) == 2


def test_one_class_is_a_clear_error(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", per_class=5, classes={"only": (1, 2, 3)})
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="at least 2 class folders"):
        discover(root)


def test_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nope")


def test_bad_percentages_are_rejected(colour_dir: Path):
    with pytest.raises(DatasetError, match="must leave some images for training"):
        assign_splits(discover(colour_dir), validation_percentage=50, testing_percentage=50)
