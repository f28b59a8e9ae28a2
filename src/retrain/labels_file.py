"""Read a multi-label file: which labels each photo carries (issue 14, first piece).

Two formats, chosen by the file's suffix:

* ``.csv``: a header row with columns ``path`` (or ``file``) and ``labels``; labels are
  separated by ``;``. Extra columns (e.g. ``sources``) are ignored.
* ``.jsonl`` / ``.json``: one JSON object per line, ``{"path": ..., "labels": [...]}``
  (``labels`` may also be a ``;``-separated string).

Paths are relative to ``image_dir``. A UTF-8 byte-order mark and CRLF line endings are
accepted. A row repeated with the same labels is kept once; the same photo listed twice
with different labels is an error (naming both lines), as are unknown photos, empty label
sets, invalid label names and paths that leave ``image_dir``. Every problem is collected
and reported at once, with line numbers, as a RetrainError. Nothing is written.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from retrain.errors import RetrainError

# A label becomes a file-name-like token in exports and the web page: keep it plain.
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]*$")
_MAX_REPORTED = 20


def read_labels_file(path: str | Path, image_dir: str | Path) -> dict[Path, tuple[str, ...]]:
    """Return {resolved photo path: sorted labels} from a CSV or JSON-lines labels file."""
    path, root = Path(path), Path(image_dir).resolve()
    if not path.is_file():
        raise RetrainError(
            f"--labels_file {path}: no such file; give a CSV (path,labels) or JSON-lines file."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RetrainError(f"--labels_file {path}: not UTF-8 text ({exc}); save it as UTF-8.") from None
    rows = _json_rows(text) if path.suffix.lower() in (".jsonl", ".json") else _csv_rows(path, text)
    result: dict[Path, tuple[str, ...]] = {}
    seen_at: dict[Path, int] = {}
    problems: list[str] = []
    for line, raw_path, raw_labels in rows:
        if raw_path is None:
            problems.append(f"line {line}: {raw_labels}")
            continue
        photo, labels, problem = _check_row(root, raw_path, raw_labels)
        if problem:
            problems.append(f"line {line}: {problem}")
        elif photo in result and result[photo] != labels:
            problems.append(
                f"line {line}: {raw_path!r} already listed on line {seen_at[photo]} with other labels "
                f"{';'.join(result[photo])!r}; keep one row per photo."
            )
        elif photo not in result:
            result[photo], seen_at[photo] = labels, line
    if problems:
        extra = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        raise RetrainError(
            f"--labels_file {path}: {len(problems)} problem(s):\n  "
            + "\n  ".join(problems[:_MAX_REPORTED])
            + extra
        )
    if not result:
        raise RetrainError(f"--labels_file {path}: no rows; list one photo per line with its labels.")
    return result


def _csv_rows(path: Path, text: str) -> list[tuple[int, str | None, object]]:
    lines = text.splitlines()  # handles CRLF and a trailing newline
    reader = csv.reader(lines)
    header = [h.strip().lower() for h in next(reader, [])]
    path_col = next((header.index(c) for c in ("path", "file") if c in header), None)
    if path_col is None or "labels" not in header:
        raise RetrainError(
            f"--labels_file {path}: header {header!r} lacks a 'path' (or 'file') and a 'labels' column; "
            "the first line must be e.g. 'path,labels'."
        )
    label_col = header.index("labels")
    rows: list[tuple[int, str | None, object]] = []
    for number, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) <= max(path_col, label_col):
            rows.append((number, None, f"expected {len(header)} columns, got {len(cells)}"))
            continue
        rows.append((number, cells[path_col], cells[label_col]))
    return rows


def _json_rows(text: str) -> list[tuple[int, str | None, object]]:
    rows: list[tuple[int, str | None, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((number, None, f"not JSON ({exc.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("path", obj.get("file")), str):
            rows.append((number, None, 'expected an object like {"path": "a.jpg", "labels": ["cat"]}'))
            continue
        rows.append((number, obj.get("path", obj.get("file")), obj.get("labels")))
    return rows


def _check_row(root: Path, raw_path: str, raw_labels: object) -> tuple[Path, tuple[str, ...], str]:
    if isinstance(raw_labels, str):
        names = [n.strip() for n in raw_labels.split(";") if n.strip()]
    elif isinstance(raw_labels, list) and all(isinstance(n, str) for n in raw_labels):
        names = [n.strip() for n in raw_labels if n.strip()]
    else:
        return root, (), f"labels {raw_labels!r} must be a ';'-separated string or a list of strings"
    photo = (root / raw_path.strip()).resolve()
    if not photo.is_relative_to(root):
        return photo, (), f"path {raw_path!r} is outside --image_dir {root}; use a path relative to it."
    if not photo.is_file():
        return photo, (), f"photo {raw_path!r} not found under --image_dir {root}."
    if not names:
        return photo, (), f"photo {raw_path!r} has no labels; give at least one or drop the row."
    bad = [n for n in names if not _LABEL_RE.match(n)]
    if bad:
        return photo, (), f"invalid label name(s) {bad!r}: use letters, digits, space, '_', '.', '+', '-'."
    return photo, tuple(sorted(set(names))), ""
