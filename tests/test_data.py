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
    classes = {
        "Sun_Flowers": (200, 200, 0),
        "daisy x": (250, 250, 250),
        "Daisy X": (10, 10, 10),
        "rosé": (200, 0, 0),
    }
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


# -- guarantees of the split ----------------------------------------------------------------------------------
def _dataset(names_per_class: dict[str, list[str]]):
    from retrain.data import Dataset, ImageRecord

    labels = sorted(names_per_class)
    records = [
        ImageRecord(path=f"/photos/{label}/{n}", rel_path=f"{label}/{n}", label_index=i)
        for i, label in enumerate(labels)
        for n in names_per_class[label]
    ]
    return Dataset(Path("/photos"), labels, records)


def _names_hashing_below(limit: float, count: int, prefix: str = "x") -> list[str]:
    """File names whose split hash (inside class "c") is below ``limit`` percent: the hash sends them out of training."""
    found, i = [], 0
    while len(found) < count:
        name = f"{prefix}{i}.jpg"
        if hash_percentage(f"c/{name}") < limit:
            found.append(name)
        i += 1
    return found


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_a_class_whose_images_all_hash_out_of_training_still_trains(n):
    # Every image hashes into validation or testing: the old split moved images only out of training.
    names = _names_hashing_below(20, n)
    ds = assign_splits(_dataset({"c": names, "d": [f"d{i}.jpg" for i in range(30)]}))
    counts = ds.counts()["c"]
    assert counts[TRAINING] >= 1 and counts[VALIDATION] >= 1 and counts[TESTING] >= 1, counts
    assert counts[TRAINING] >= max(counts[VALIDATION], counts[TESTING]), counts


def test_every_class_of_3_or_more_gets_each_split_and_training_the_largest_share():
    import random

    rng = random.Random(0)
    for trial in range(300):
        sizes = {f"k{j}": rng.randint(1, 12) for j in range(4)}
        ds = assign_splits(
            _dataset({k: [f"{trial}_{i}.jpg" for i in range(n)] for k, n in sizes.items()}),
            validation_percentage=rng.choice([5, 10, 30]),
            testing_percentage=rng.choice([5, 10, 30]),
        )
        for label, c in ds.counts().items():
            if sizes[label] >= 3:
                assert min(c.values()) >= 1, (trial, label, c)
                assert c[TRAINING] >= max(c[VALIDATION], c[TESTING]), (trial, label, c)
            else:
                assert c[TRAINING] == sizes[label]


def test_zero_percent_means_no_such_split():
    ds = assign_splits(
        _dataset({"c": [f"{i}.jpg" for i in range(10)], "d": [f"{i}.jpg" for i in range(10)]}),
        validation_percentage=0,
        testing_percentage=30,
    )
    for c in ds.counts().values():
        assert c[VALIDATION] == 0 and c[TESTING] >= 1 and c[TRAINING] >= c[TESTING]


def test_identical_files_always_share_a_split():
    # 40 photos, each also present under 2 other names (copies): the same content must never straddle splits.
    names = {"c": [], "d": [f"d{i}.jpg" for i in range(20)]}
    keys = {}
    for i in range(40):
        for copy in ("a", "b", "c"):
            name = f"{copy}_photo{i}.jpg"
            names["c"].append(name)
            keys[f"/photos/c/{name}"] = bytes([i]) * 20
    plain = assign_splits(_dataset(names))
    assert any(
        len({r.split for r in plain.records if keys.get(r.path) == bytes([i]) * 20}) > 1 for i in range(40)
    )
    ds = assign_splits(_dataset(names), keys=keys)
    for i in range(40):
        splits = {r.split for r in ds.records if keys.get(r.path) == bytes([i]) * 20}
        assert len(splits) == 1, (i, splits)
    assert set(ds.counts()["c"].values()) != {0} and min(ds.counts()["c"].values()) >= 3


def test_keys_leave_the_split_of_distinct_files_as_it_was(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", per_class=40)
    ds = discover(root)
    keys = {r.path: bytes(20 - len(r.rel_path.encode()[:20])) + r.rel_path.encode()[:20] for r in ds.records}
    assert len(set(keys.values())) == len(keys)
    assert _splits(assign_splits(ds, keys=keys)) == _splits(assign_splits(ds))
    expected = {r.rel_path: which_split(r.rel_path, 10, 10) for r in ds.records}
    moved = [p for p, s in _splits(assign_splits(ds)).items() if s != expected[p]]
    assert not moved  # 40 per class: the hash alone fills every split, nothing is moved


def test_a_class_of_identical_photos_is_not_split():
    ds = assign_splits(
        _dataset({"c": ["1.jpg", "2.jpg", "3.jpg", "4.jpg"], "d": [f"{i}.jpg" for i in range(9)]}),
        keys={f"/photos/c/{i}.jpg": b"\1" * 20 for i in range(1, 5)},
    )
    assert ds.counts()["c"] == {TRAINING: 4, VALIDATION: 0, TESTING: 0}
    assert any("identical or _nohash_" in n for n in ds.notices)


def test_training_run_keeps_identical_files_in_one_split(tmp_path: Path, fast_config, monkeypatch):
    import retrain
    import retrain.splits as stage  # split_features calls assign_splits there

    root = make_image_folder(tmp_path / "d", per_class=12)
    for f in sorted((root / "red").iterdir()):  # every red photo twice, under another name
        shutil.copy(f, root / "red" / f"copy_of_{f.name}")
    seen = []
    real = stage.assign_splits
    monkeypatch.setattr(stage, "assign_splits", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    retrain.train(root, **fast_config)
    split_of: dict[str, set[str]] = {}
    for r in seen[0].records:
        split_of.setdefault(r.rel_path.replace("copy_of_", ""), set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values()), split_of
    assert {TRAINING, VALIDATION, TESTING} <= {s for (s,) in split_of.values()}
