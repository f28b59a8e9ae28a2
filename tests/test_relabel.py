"""`retrain relabel`: move / remove as the CSV says, never delete or overwrite, undo puts everything back."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import make_image_folder
from retrain.cli import retrain_main
from retrain.errors import RetrainError
from retrain.relabel import quarantine_dir, relabel, undo

HEADER = ["path", "given_label", "suggested_label", "score", "rank", "split", "action"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root.parent)): p.read_bytes() for p in root.parent.rglob("*.jpg")}


def _csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "lib" / "images", per_class=3)


def test_move_and_remove_then_undo(photos, tmp_path):
    before = _snapshot(photos)
    red0, red1, blue2 = (
        photos / "red" / "img_000.jpg",
        photos / "red" / "img_001.jpg",
        photos / "blue" / "img_002.jpg",
    )
    assert (photos / "green" / "img_000.jpg").exists()  # the name red/img_000.jpg would take in green
    table = _csv(
        tmp_path / "label_issues.csv",
        [
            [str(red0), "red", "green", "0.9", "1", "training", "move"],
            [str(red1), "red", "blue", "0.8", "2", "testing", "Keep"],
            [str(blue2), "blue", "red", "0.7", "3", "training", " remove "],
        ],
    )
    result = relabel(table, image_dir=photos)
    assert len(result.moved) == 2
    assert not red0.exists() and (photos / "green" / "img_000-1.jpg").exists()  # never overwrites
    assert (photos / "green" / "img_000.jpg").read_bytes() == before["images/green/img_000.jpg"]
    assert (quarantine_dir(photos) / "blue" / "img_002.jpg").exists() and not blue2.exists()
    assert red1.exists()
    assert sorted(_snapshot(photos).values()) == sorted(before.values())  # nothing lost
    restored, problems = undo(result.log_path)
    assert (restored, problems) == (2, [])
    assert _snapshot(photos) == before


def test_the_cli_writes_a_log_and_undoes_it(photos, tmp_path, capsys):
    before = _snapshot(photos)
    src = photos / "blue" / "img_001.jpg"
    table = _csv(tmp_path / "label_issues.csv", [[str(src), "blue", "red", "0.9", "1", "training", "move"]])
    assert retrain_main(["relabel", str(table), "--image_dir", str(photos)]) == 0
    out = capsys.readouterr().out
    log = out.split("retrain relabel --undo ")[1].strip()
    assert (photos / "red" / "img_001.jpg").exists() and not src.exists()
    assert retrain_main(["relabel", "--undo", log]) == 0
    assert _snapshot(photos) == before


def test_dry_run_moves_nothing(photos, tmp_path):
    before = _snapshot(photos)
    table = _csv(
        tmp_path / "l.csv", [[str(photos / "red" / "img_000.jpg"), "red", "blue", "1", "1", "", "move"]]
    )
    assert len(relabel(table, image_dir=photos, dry_run=True).moved) == 1
    assert _snapshot(photos) == before


@pytest.mark.parametrize(
    "row, message",
    [
        (["{red}/img_000.jpg", "red", "blue", "1", "1", "", "delete"], "not one of move, remove"),
        (["{red}/nope.jpg", "red", "blue", "1", "1", "", "move"], "does not exist"),
        (["{red}/img_000.jpg", "red", "purple", "1", "1", "", "move"], "not a class folder"),
        (["{red}/../../outside.jpg", "red", "blue", "1", "1", "", "remove"], "not inside the image folder"),
    ],
)
def test_bad_rows_stop_everything_before_any_move(photos, tmp_path, row, message):
    (photos.parent / "outside.jpg").write_bytes((photos / "red" / "img_001.jpg").read_bytes())
    before = _snapshot(photos)
    good = [str(photos / "green" / "img_000.jpg"), "green", "red", "1", "1", "", "move"]
    bad = [row[0].format(red=photos / "red"), *row[1:]]
    table = _csv(tmp_path / "l.csv", [good, bad])
    with pytest.raises(RetrainError, match=message):
        relabel(table, image_dir=photos)
    assert _snapshot(photos) == before


def test_a_csv_without_an_action_column(photos, tmp_path):
    table = tmp_path / "x.csv"
    table.write_text("path,given_label\na.jpg,red\n")
    with pytest.raises(RetrainError, match="no column.*action"):
        relabel(table, image_dir=photos)


def test_undo_never_overwrites(photos, tmp_path):
    src = photos / "red" / "img_002.jpg"
    table = _csv(tmp_path / "l.csv", [[str(src), "red", "green", "1", "1", "", "move"]])
    result = relabel(table, image_dir=photos)
    src.write_bytes(b"a new file with the old name")
    restored, problems = undo(result.log_path)
    assert restored == 0 and "exists again" in problems[0]
    assert src.read_bytes() == b"a new file with the old name" and (photos / "green" / "img_002.jpg").exists()
