"""Stage 1: find the images, name the classes, split them into training, validation and testing.

Each sub-folder of the image folder is one class, named exactly as the folder is
named; files anywhere below it belong to it. The split is retrain.py's stable hash
split, computed from the path *relative to the image folder*, so moving or renaming
the dataset root never moves an image between sets.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from retrain.errors import DatasetError
from retrain.images import is_image_file_name

TRAINING, VALIDATION, TESTING = "training", "validation", "testing"
SPLITS = (TRAINING, VALIDATION, TESTING)

# retrain.py's constant: the hash is taken modulo this + 1, so adding images never moves old ones.
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")


def printable(text: str) -> str:
    """A path that can always be printed: undecodable bytes of non-UTF-8 names become escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ImageRecord:
    path: str  # as found on disk, usable with open()
    rel_path: str  # "class/sub/file.jpg", "/"-separated, relative to the image folder
    label_index: int
    split: str = TRAINING


@dataclass
class Dataset:
    image_dir: Path
    labels: list[str]
    records: list[ImageRecord]
    notices: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per class, the number of images in each split."""
        table = {label: dict.fromkeys(SPLITS, 0) for label in self.labels}
        for r in self.records:
            table[self.labels[r.label_index]][r.split] += 1
        return table


def _walk_files(top: str) -> Iterable[str]:
    """Every file path below ``top``, following directory symlinks but never looping."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def discover(image_dir: str | os.PathLike) -> Dataset:
    """List the classes and their image files. Splits are assigned later by :func:`assign_splits`."""
    root = Path(image_dir)
    if not root.exists():
        raise DatasetError(f"image folder {printable(str(root))!r} does not exist. Pass --image_dir PATH.")
    if not root.is_dir():
        raise DatasetError(
            f"--image_dir {printable(str(root))!r} is a file; it must be a folder of class folders."
        )
    notices: list[str] = []
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        raise DatasetError(
            f"cannot list image folder {printable(str(root))!r}: {exc.strerror or exc}"
        ) from None
    top_files = [e for e in entries if (root / e).is_file() and not e.startswith(".")]
    if top_files:
        notices.append(
            f"ignored {len(top_files)} file(s) at the top level of {printable(str(root))} "
            f"(images must be inside one sub-folder per class), e.g. {printable(top_files[0])}"
        )
    class_dirs = [e for e in entries if not e.startswith(".") and (root / e).is_dir()]
    labels: list[str] = []
    records: list[ImageRecord] = []
    for name in class_dirs:
        files, other = [], 0
        for path in _walk_files(str(root / name)):
            base = os.path.basename(path)
            if is_image_file_name(base):
                files.append(path)
            elif not base.startswith(".") and base not in ("Thumbs.db", "desktop.ini"):
                other += 1
        if other:
            notices.append(f"class {printable(name)!r}: ignored {other} file(s) without an image extension")
        if not files:
            notices.append(f"class {printable(name)!r} has no images; it is left out")
            continue
        index = len(labels)
        labels.append(_label_for(name, notices))
        prefix = str(root / name) + os.sep  # _walk_files yields paths under it: slicing beats relpath 10x
        for path in files:
            rel = name + "/" + path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
            if os.sep != "/":
                rel = rel.replace(os.sep, "/")
            records.append(ImageRecord(path=path, rel_path=rel, label_index=index))
    _check_case_collisions(labels, notices)
    dataset = Dataset(image_dir=root, labels=labels, records=records, notices=notices)
    require_classes(dataset)
    return dataset


def _label_for(folder: str, notices: list[str]) -> str:
    """The folder name, unless it cannot be one line of UTF-8 (the labels file and the model's metadata)."""
    label = printable(folder).replace("\r", "\\r").replace("\n", "\\n")
    if label != folder:
        notices.append(
            f"class folder '{label}': its name is not valid UTF-8 or holds a line break, so its label is "
            "written with the escapes shown (rename the folder to choose another label)"
        )
    return label


def _check_case_collisions(labels: Sequence[str], notices: list[str]) -> None:
    by_fold = Counter(label.casefold() for label in labels)
    clashes = sorted(label for label in labels if by_fold[label.casefold()] > 1)
    if clashes:
        notices.append(
            "class names that differ only in case are kept as separate classes: "
            + ", ".join(map(repr, clashes))
        )


def require_classes(dataset: Dataset) -> None:
    present = sorted({r.label_index for r in dataset.records})
    if len(present) < 2:
        found = ", ".join(repr(printable(dataset.labels[i])) for i in present) or "none"
        raise DatasetError(
            f"need images in at least 2 class folders under {printable(str(dataset.image_dir))}, "
            f"found {len(present)} ({found}). Put each class's images in its own sub-folder, e.g. "
            f"{printable(str(dataset.image_dir))}/cats/*.jpg and {printable(str(dataset.image_dir))}/dogs/*.jpg."
        )


def hash_percentage(rel_path: str) -> float:
    """retrain.py's split hash, in [0, 100], of a path relative to the image folder.

    Everything from ``_nohash_`` on is dropped from the name first, so near-duplicates
    such as ``leaf1_nohash_a.jpg`` and ``leaf1_nohash_b.jpg`` always land in the same set.
    """
    name = _NOHASH.sub("", rel_path)
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()
    return (int(digest, 16) % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)


def which_split(rel_path: str, validation_percentage: float, testing_percentage: float) -> str:
    p = hash_percentage(rel_path)
    if p < validation_percentage:
        return VALIDATION
    if p < validation_percentage + testing_percentage:
        return TESTING
    return TRAINING


def assign_splits(
    dataset: Dataset,
    *,
    validation_percentage: float = 10,
    testing_percentage: float = 10,
    keys: Mapping[str, bytes] | None = None,
) -> Dataset:
    """Return a copy of ``dataset`` with every record's split set.

    ``keys`` (path -> content key, e.g. the SHA-1 of the file) makes identical files of one
    class share a split, as ``_nohash_`` names do, so no photo is both trained on and tested.
    Each group of such files takes the split of retrain.py's hash of its first name.

    A class with three or more groups gets at least one in each split whose percentage is
    above zero, and training keeps the largest share: when the hash leaves a split empty, or
    training smaller than another split, the group whose hash lies nearest moves over, so the
    choice is as stable as the split itself. Smaller classes train on all their images and
    are reported as untested.
    """
    for name, value in (
        ("validation_percentage", validation_percentage),
        ("testing_percentage", testing_percentage),
    ):
        if not 0 <= value < 100:
            raise DatasetError(f"--{name} must be between 0 and 100, got {value}")
    if validation_percentage + testing_percentage >= 100:
        raise DatasetError(
            f"--validation_percentage ({validation_percentage}) + --testing_percentage ({testing_percentage}) "
            "must leave some images for training (sum below 100)"
        )
    by_class: dict[int, list[ImageRecord]] = {}
    for r in dataset.records:
        by_class.setdefault(r.label_index, []).append(r)
    wanted = [TRAINING] + [
        s for s, pct in ((VALIDATION, validation_percentage), (TESTING, testing_percentage)) if pct > 0
    ]
    records: list[ImageRecord] = []
    notices = list(dataset.notices)
    for index, items in sorted(by_class.items()):
        groups = _content_groups(items, keys or {})
        if len(groups) < 3:
            records.extend(replace(r, split=TRAINING) for r in items)
            what = (
                f"{len(items)} image(s)"
                if len(groups) == len(items)
                else f"{len(items)} image(s) in {len(groups)} group(s) of identical or _nohash_ files"
            )
            notices.append(
                f"class {printable(dataset.labels[index])!r} has only {what}: all are used for training, "
                "none for validation or testing, so its accuracy is not measured (add images to fix)"
            )
            continue
        split_of = {g: which_split(g.name, validation_percentage, testing_percentage) for g in groups}
        _balance(split_of, wanted)
        records.extend(replace(r, split=split_of[g]) for g in groups for r in g.records)
    return Dataset(dataset.image_dir, dataset.labels, records, notices)


@dataclass(eq=False)
class _Group:
    """Files of one class that must share a split: the same ``_nohash_`` name or the same content."""

    name: str  # the name whose hash decides the split: the smallest among the members
    records: list[ImageRecord]

    @property
    def hash(self) -> float:
        return hash_percentage(self.name)


def same_image_groups(names: Sequence[str], keys: Sequence[bytes | None]) -> list[int]:
    """A group id per file: files with the same ``_nohash_`` stem or the same content key (None: unknown)
    share one. Groups are closed under both relations (a union-find), so a chain of copies and renamed
    near-duplicates is one group however it is linked."""
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[object, int] = {}
    for i, (name, key) in enumerate(zip(names, keys)):
        for tag in (("name", _NOHASH.sub("", name)), ("key", key)):
            if tag[1] is None:
                continue
            j = first.setdefault(tag, i)
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(names))]


def _content_groups(items: list[ImageRecord], keys: Mapping[str, bytes]) -> list[_Group]:
    """Union of files with the same ``_nohash_`` stem or the same content key, in a stable order."""
    ids = same_image_groups([r.rel_path for r in items], [keys.get(r.path) for r in items])
    members: dict[int, list[ImageRecord]] = {}
    for gid, r in zip(ids, items):
        members.setdefault(gid, []).append(r)
    return [_Group(min(r.rel_path for r in rs), rs) for rs in members.values()]


# Where each split lies on the hash line: validation [0, v), testing [v, v + t), training the rest.
_POSITION = {VALIDATION: 0, TESTING: 1, TRAINING: 2}


def _balance(split_of: dict[_Group, str], wanted: list[str]) -> None:
    """Fill every wanted split that the hash left empty, then give training the largest share."""

    def size(split: str) -> int:
        return sum(len(g.records) for g, s in split_of.items() if s == split)

    def move_one(to: str, donors: list[str]) -> bool:
        donors = [d for d in donors if sum(s == d for s in split_of.values()) > 1]  # never empty a donor
        if not donors:
            return False
        donor = max(donors, key=lambda d: (size(d), d == TRAINING))
        candidates = [g for g, s in split_of.items() if s == donor]
        # The group nearest the target on the hash line: the highest hash if the target lies above.
        nearest = max if _POSITION[to] > _POSITION[donor] else min
        split_of[nearest(candidates, key=lambda g: (g.hash, g.name))] = to
        return True

    for split in wanted:
        if size(split) == 0:
            move_one(split, [s for s in wanted if s != split])
    while any(size(s) > size(TRAINING) for s in wanted):
        biggest = max((s for s in wanted if s != TRAINING), key=size)
        if not move_one(TRAINING, [biggest]):
            break


def drop_records(dataset: Dataset, bad_paths: set[str]) -> Dataset:
    """A copy of ``dataset`` without the given (unreadable) files; classes left empty are dropped from use."""
    kept = [r for r in dataset.records if r.path not in bad_paths]
    emptied = sorted({r.label_index for r in dataset.records} - {r.label_index for r in kept})
    notices = list(dataset.notices)
    for i in emptied:
        notices.append(f"class {printable(dataset.labels[i])!r} has no readable images; it is left out")
    if emptied:
        # Keep label order stable but renumber so labels only lists trained classes.
        keep = [i for i in range(len(dataset.labels)) if i not in emptied]
        new_index = {old: new for new, old in enumerate(keep)}
        labels = [dataset.labels[i] for i in keep]
        kept = [replace(r, label_index=new_index[r.label_index]) for r in kept]
    else:
        labels = list(dataset.labels)
    out = Dataset(dataset.image_dir, labels, kept, notices)
    require_classes(out)
    return out
