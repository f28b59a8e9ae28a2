"""Tests for the multi-label file reader (issue 14)."""

from __future__ import annotations

import pytest

from retrain.errors import RetrainError
from retrain.labels_file import read_labels_file


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(b"x")
    return root


def test_csv_with_bom_crlf_and_duplicate_row(tmp_path, image_dir):
    f = tmp_path / "labels.csv"
    f.write_bytes(
        "\ufefffile,labels,sources\r\na.jpg,dog;cat,x\r\na.jpg,cat;dog,y\r\nb.jpg,cat,z\r\n".encode()
    )
    got = read_labels_file(f, image_dir)
    assert got == {(image_dir / "a.jpg").resolve(): ("cat", "dog"), (image_dir / "b.jpg").resolve(): ("cat",)}


def test_jsonl(tmp_path, image_dir):
    f = tmp_path / "labels.jsonl"
    f.write_text('{"path": "a.jpg", "labels": ["dog"]}\n\n{"path": "b.jpg", "labels": "cat;dog"}\n')
    assert read_labels_file(f, image_dir)[(image_dir / "b.jpg").resolve()] == ("cat", "dog")


def test_all_problems_reported_with_line_numbers(tmp_path, image_dir):
    f = tmp_path / "labels.csv"
    f.write_text(
        "path,labels\nmissing.jpg,dog\na.jpg,\n../photos/../x.jpg,dog\nb.jpg,<b>\na.jpg,dog\na.jpg,cat\n"
    )
    with pytest.raises(RetrainError) as err:
        read_labels_file(f, image_dir)
    msg = str(err.value)
    assert "line 2" in msg and "not found" in msg
    assert "line 3" in msg and "no labels" in msg
    assert "line 4" in msg and "outside --image_dir" in msg
    assert "line 5" in msg and "invalid label" in msg
    assert "line 7" in msg and "line 6" in msg


def test_bad_header_and_missing_file(tmp_path, image_dir):
    f = tmp_path / "labels.csv"
    f.write_text("name,tags\na.jpg,dog\n")
    with pytest.raises(RetrainError, match="header"):
        read_labels_file(f, image_dir)
    with pytest.raises(RetrainError, match="no such file"):
        read_labels_file(tmp_path / "nope.csv", image_dir)


def test_real_multilabel_set_reads():
    from pathlib import Path

    root = Path("/work/data/multilabel")
    if not (root / "labels.csv").is_file():
        pytest.skip("benchmark photos not present")
    got = read_labels_file(root / "labels.csv", root / "images")
    assert len(got) == 400 and all(got.values())


def test_absolute_paths_and_links_leading_out_are_outside(tmp_path, image_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.jpg").write_bytes(b"x")
    (image_dir / "link.jpg").symlink_to(elsewhere / "c.jpg")
    f = tmp_path / "labels.csv"
    f.write_text(
        f"path,labels\na.jpg,dog\n{elsewhere / 'c.jpg'},cat\nlink.jpg,cat\n{image_dir / 'b.jpg'},cat\n"
    )
    with pytest.raises(RetrainError) as err:
        read_labels_file(f, image_dir)
    msg = str(err.value)
    assert "line 3" in msg and "line 4" in msg and msg.count("outside --image_dir") == 2
    assert "line 5" not in msg  # an absolute path inside --image_dir is that photo
