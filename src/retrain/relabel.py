"""``retrain relabel label_issues.csv``: apply what the user decided about suspected label errors.

Rows whose ``action`` is ``move`` go to the class folder of their ``suggested_label``; rows
marked ``remove`` go to a quarantine folder beside the image folder (``<image_dir>_quarantine``,
keeping their class sub-folder). Nothing is ever deleted or overwritten: a name already taken
gets a numbered suffix. Every move is appended to an undo log as it happens, so even an
interrupted run can be undone with ``retrain relabel --undo LOG``. All rows are checked before
the first file moves: one bad row stops everything with a message naming it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retrain.data import printable
from retrain.errors import RetrainError

ACTIONS = ("move", "remove")
KEEP = ("", "keep")


@dataclass
class RelabelResult:
    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to)
    log_path: Path | None = None


def relabel(
    csv_path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None, dry_run: bool = False
) -> RelabelResult:
    """Move the files the CSV's ``action`` column asks for; returns what moved and the undo log's path.

    ``image_dir`` defaults to the one recorded in ``audit.npz`` beside the CSV (the run that wrote it).
    """
    csv_path = Path(csv_path)
    root = Path(image_dir) if image_dir else _image_dir_of_run(csv_path)
    plan = _plan(_read_rows(csv_path), root)
    result = RelabelResult()
    if dry_run or not plan:
        result.moved = [(str(a), str(b)) for a, b in plan]
        return result
    result.log_path = csv_path.with_name(f"relabel-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(result.log_path, "x", encoding="utf-8") as log:
        for src, dest in plan:
            dest = _free_name(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(os.fspath(src), os.fspath(dest))
            # Logged as soon as it happened: an interruption never loses track of a moved file.
            log.write(json.dumps({"from": os.fspath(src), "to": os.fspath(dest)}) + "\n")
            log.flush()
            result.moved.append((os.fspath(src), os.fspath(dest)))
    return result


def undo(log_path: str | os.PathLike) -> tuple[int, list[str]]:
    """Put back every file a relabel log moved, newest first. Returns (restored, problems).

    A file that is no longer where the log put it, or whose old place is taken again, is left
    alone and named in ``problems``: undo never overwrites either.
    """
    log_path = Path(log_path)
    try:
        lines = log_path.read_text(encoding="utf-8").splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise RetrainError(f"cannot read the undo log {printable(str(log_path))}: {exc}") from None
    restored, problems = 0, []
    for entry in reversed(entries):
        src, dest = Path(entry["from"]), Path(entry["to"])
        if not dest.exists():
            problems.append(f"{printable(str(dest))} is gone (already put back?); left as is")
            continue
        if src.exists():
            problems.append(f"{printable(str(src))} exists again; {printable(str(dest))} left where it is")
            continue
        src.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(dest), os.fspath(src))
        restored += 1
    return restored, problems


def quarantine_dir(image_dir: Path) -> Path:
    """Where removed images go: beside the image folder, so training never finds them."""
    return image_dir.parent / f"{image_dir.name}_quarantine"


# -- steps ----------------------------------------------------------------------------------------------
def _image_dir_of_run(csv_path: Path) -> Path:
    """The image folder of the run that wrote the CSV, from its audit.npz (an absolute path)."""
    import numpy as np

    audit = csv_path.with_name("audit.npz")
    try:
        with np.load(audit, allow_pickle=False) as z:
            return Path(os.fsdecode(bytes(z["image_dir"])))
    except Exception:  # noqa: BLE001 - missing or damaged: the user names the folder
        raise RetrainError(
            f"no audit.npz of a run beside {printable(str(csv_path))} to say which image folder it is about; "
            "pass --image_dir DIR"
        ) from None


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise RetrainError(f"cannot read {printable(str(csv_path))}: {exc.strerror or exc}") from None
    needed = {"path", "suggested_label", "action"}
    missing = needed - set(rows[0] if rows else needed)
    if missing:
        raise RetrainError(
            f"{printable(str(csv_path))} has no column(s) {', '.join(sorted(missing))}: give the label_issues.csv "
            "written by retrain (or the one downloaded from report.html), with an 'action' column"
        )
    return rows


def _plan(rows: list[dict[str, str]], root: Path) -> list[tuple[Path, Path]]:
    """(from, to) for every row with an action, after checking all of them."""
    if not root.is_dir():
        raise RetrainError(f"image folder {printable(str(root))} does not exist; pass --image_dir DIR")
    root = root.resolve()
    plan, seen = [], set()
    for line, row in enumerate(rows, start=2):
        action = (row.get("action") or "").strip().lower()
        if action in KEEP:
            continue
        where = f"line {line} ({printable(row['path'])})"
        if action not in ACTIONS:
            raise RetrainError(
                f"{where}: action {row['action']!r} is not one of move, remove, keep (or empty)"
            )
        src = Path(row["path"]).resolve()
        if src in seen:
            raise RetrainError(f"{where}: the same file is listed twice")
        seen.add(src)
        if not src.is_file():
            raise RetrainError(f"{where}: the file does not exist (moved already?); remove the row's action")
        try:
            rel = src.relative_to(root)
        except ValueError:
            raise RetrainError(
                f"{where}: the file is not inside the image folder {printable(str(root))}"
            ) from None
        if len(rel.parts) < 2:
            raise RetrainError(f"{where}: the file is not inside a class folder of {printable(str(root))}")
        if action == "move":
            target = row["suggested_label"]
            if not target or "/" in target or target in (".", "..") or not (root / target).is_dir():
                raise RetrainError(
                    f"{where}: suggested label {target!r} is not a class folder of {printable(str(root))}"
                )
            plan.append((src, root / target / Path(*rel.parts[1:])))
        else:
            plan.append((src, quarantine_dir(root) / rel))
    return plan


def _free_name(dest: Path) -> Path:
    """``dest``, or ``name-1.jpg``, ``name-2.jpg``... if it is taken: never overwrite a photo."""
    n = 0
    candidate = dest
    while candidate.exists():
        n += 1
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
    return candidate


# -- `retrain relabel` -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="retrain relabel",
        description="Apply the 'action' column of label_issues.csv: move -> the suggested class folder, remove -> "
        "a quarantine folder beside the image folder. Nothing is deleted; an undo log is written.",
    )
    p.add_argument("csv", nargs="?", help="label_issues.csv with an action column (move / remove / keep)")
    p.add_argument("--image_dir", "--image-dir", default="", help="the image folder (default: the run's)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="only print what would move")
    p.add_argument("--undo", default="", metavar="LOG", help="put back everything a relabel log moved")
    ns = p.parse_args(argv)
    if ns.undo:
        restored, problems = undo(ns.undo)
        for problem in problems:
            print(f"warning: {problem}")
        print(f"Put back {restored} file(s).")
        return 0
    if not ns.csv:
        p.error("give label_issues.csv, or --undo LOG")
    result = relabel(ns.csv, image_dir=ns.image_dir or None, dry_run=ns.dry_run)
    for src, dest in result.moved:
        print(f"{'would move' if ns.dry_run else 'moved'} {printable(src)} -> {printable(dest)}")
    if result.log_path:
        print(
            f"Moved {len(result.moved)} file(s). Undo with: retrain relabel --undo {printable(str(result.log_path))}"
        )
    elif not result.moved:
        print("No row has an action (move or remove): nothing to do.")
    return 0
