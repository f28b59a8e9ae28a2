#!/usr/bin/env python3
"""Rebuild ``src/retrain/sample_data/photos`` from Debian's ``gcompris-qt-data``.

The bundled sample photos come from the GCompris educational suite, whose data
Debian ships as Qt binary resource bundles (``.rcc``).  This script makes the
selection reproducible:

1. ``apt-get download gcompris-qt-data`` (or use ``--deb``) and ``dpkg -x`` it
   into a temporary folder (nothing is installed system-wide);
2. unpack the ``.rcc`` bundles we draw from with ``extract_gcompris_rcc.py``;
3. parse each activity's ``README`` (GCompris' per-file licence listing) and
   keep only files whose licence is *Public Domain* or *CC0-1.0*;
4. resize so the longest side is at most 320 px (Lanczos), flatten any alpha
   onto white and save as baseline JPEG, quality 88, with no metadata;
5. write ``ATTRIBUTION.md`` (author, source URL and licence of every file).

With ``--heldout DIR`` it also writes, outside the package, a held-out test
set of *other* real photos of the same classes from the same Debian package
(these may carry other licences, e.g. CC-BY-SA; they are for local evaluation
only and are never committed).

Usage (from the repository root; needs Pillow with WebP support, apt-get and
dpkg)::

    python tools/make_sample_data.py [--deb gcompris-qt-data_3.1-2_all.deb]
                                     [--heldout /work/heldout_photos]

The output is deterministic for a given ``.deb`` (Pillow version aside).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_gcompris_rcc import extract  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "src" / "retrain" / "sample_data"
PACKAGE = "gcompris-qt-data"
EXPECTED_VERSION = "3.1-2"
MAX_SIDE = 320
QUALITY = 88
FREE = ("public domain", "cc0-1.0", "cc0")

ACT = "gcompris/src/activities"
CAT = f"{ACT}/categorization/resource/images"
EXPLORE_MON = f"{ACT}/explore_monuments/resource"

# class -> list of (folder inside the unpacked rcc tree, which files): None = all of them,
# "even" = every other file in sorted order (the others feed the held-out set).
# Only files whose README licence is PD/CC0 are used, whatever is listed here, and a
# photo that another activity already contributed (same picture) is taken once.
BUNDLE = {
    "animals": [
        (f"{ACT}/explore_world_animals/resource/animals", None),
        (f"{ACT}/explore_farm_animals/resource/animals", None),
        (f"{ACT}/erase/resource", None),  # mostly CC-BY-SA: only the PD/CC0 few survive
    ],
    "fish": [(f"{CAT}/fishes", None)],
    "landmarks": [(f"{CAT}/monuments", None), (EXPLORE_MON, "even")],
    "tools": [(f"{CAT}/tools", None)],
}
# Photos that pass the licence filter but are left out on content grounds.
EXCLUDE = {
    f"{ACT}/explore_world_animals/resource/animals/narwhal.webp",  # a pod at the sea surface: fish-like
    f"{EXPLORE_MON}/usa/canyondeChelly.webp",  # a canyon landscape, no monument in view
    f"{EXPLORE_MON}/wonders/colosseum.webp",  # the same Commons file as categorization/monuments
    # (explore_monuments' brandenburgGate / greatPyramidOfGiza are also reused photos; the
    # fingerprint check below drops them)
}
RCC_FILES = [
    "categorization",
    "explore_world_animals",
    "explore_farm_animals",
    "erase",
    "explore_monuments",
    "details",
]
# Held-out (never bundled): the rest of explore_monuments, the non-free animal
# photos of "erase", and the landmark photos behind the "details" puzzles.
DETAILS_LANDMARKS = [
    "Chenonceau",
    "EgeskovSlotSpejling",
    "EilanDonanCastle",
    "GizahPyramids",
    "Louvre_2007_02_24_c",
    "NDP",
    "Nagoya",
    "Neuschwanstein",
    "OperaSidney",
    "TajMahal",
    "TourEiffel",
    "TowerBridgeLondon",
]


# File names misspelt in the upstream READMEs -> the real file names.
README_TYPOS = {
    "germany/audaPalatina.webp": "germany/aulaPalatina.webp",
    "screDriver.webp": "screwDriver.webp",
}


@dataclass
class Entry:
    path: str  # relative to the unpacked tree
    author: str
    source: str
    licence: str


def parse_readme(folder: Path, rel_folder: str) -> dict[str, Entry]:
    """Map 'rel/path/file.webp' -> Entry from a GCompris README (blank-line separated stanzas)."""
    text = (folder / "README").read_text(encoding="utf-8")
    entries: dict[str, Entry] = {}
    key_re = re.compile(r"^\s*(Copyright|Source|License|Licence|Comments?|Files)\s*:\s*(.*)$")
    file_re = re.compile(r"^([\w-]+(?:/[\w-]+)*\.(?:webp|png|jpe?g))$")
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        names: list[str] = []
        for line in stanza.splitlines():
            m = key_re.match(line)
            if m:
                fields.setdefault(m.group(1), m.group(2).strip())
                rest = m.group(2).strip() if m.group(1) == "Files" else ""
            else:
                rest = line.strip()
            for token in rest.split():
                if file_re.match(token):
                    names.append(README_TYPOS.get(token, token))
        lic = fields.get("License") or fields.get("Licence") or ""
        for name in names:
            key = f"{rel_folder}/{name}"
            entries[key] = Entry(key, fields.get("Copyright", ""), fields.get("Source", ""), lic)
    return entries


def is_free(licence: str) -> bool:
    return licence.strip().lower() in FREE


def to_jpeg(src: Path, dst: Path) -> None:
    im = Image.open(src)
    im.load()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    im = im.convert("RGB")
    scale = MAX_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY, optimize=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())


def fingerprint(path: Path) -> np.ndarray:
    """Normalised 16x16 grey thumbnail, to spot the same photo reused by two activities."""
    a = np.asarray(Image.open(path).convert("L").resize((16, 16), Image.BILINEAR), np.float32).ravel()
    return (a - a.mean()) / (a.std() * np.sqrt(a.size) + 1e-6)


def is_duplicate(path: Path, seen: list[np.ndarray], threshold: float = 0.97) -> bool:
    """True if ``path`` is (nearly) the same picture as one already taken; else remembers it."""
    fp = fingerprint(path)
    if any(float(fp @ other) > threshold for other in seen):
        return True
    seen.append(fp)
    return False


def fetch_deb(workdir: Path, deb: Path | None) -> tuple[Path, str]:
    if deb is None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
        deb = next(workdir.glob(f"{PACKAGE}_*.deb"))
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = workdir / "deb"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root, version


def unpack(root: Path, tree: Path) -> None:
    for name in RCC_FILES:
        extract(root / "usr/share/gcompris-qt/rcc" / f"{name}.rcc", tree)


def candidates(tree: Path, folder: str, which) -> list[Path]:
    files = sorted(p for p in (tree / folder).rglob("*.webp"))
    if which in ("even", "odd"):
        files = [p for i, p in enumerate(files) if i % 2 == (0 if which == "even" else 1)]
    return files


def stem_name(rel: str) -> str:
    """Output file name: activity-derived prefix + original stem, lower-case ASCII."""
    parts = rel.split("/")
    activity = parts[3]
    prefix = {
        "categorization": "cat",
        "explore_world_animals": "world",
        "explore_farm_animals": "farm",
        "erase": "erase",
        "explore_monuments": "mon",
        "details": "details",
    }[activity]
    stem = Path(rel).stem
    if activity == "explore_monuments":
        stem = f"{parts[-2]}_{stem}"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_").lower()
    return f"{prefix}_{stem}.jpg"


def readme_for(tree: Path, rel: str, cache: dict) -> Entry | None:
    folder = Path(rel).parent
    while str(folder) not in (".", ""):
        if (tree / folder / "README").exists():
            key = str(folder)
            if key not in cache:
                cache[key] = parse_readme(tree / folder, key)
            return cache[key].get(rel)
        folder = folder.parent
    return None


def build_bundle(tree: Path, version: str) -> tuple[dict[str, list[tuple[str, Entry]]], list[np.ndarray]]:
    photos = OUT / "photos"
    if photos.exists():
        shutil.rmtree(photos)
    cache: dict = {}
    seen: list[np.ndarray] = []
    chosen: dict[str, list[tuple[str, Entry]]] = {}
    for cls, sources in BUNDLE.items():
        chosen[cls] = []
        for folder, which in sources:
            for src in candidates(tree, folder, which):
                rel = src.relative_to(tree).as_posix()
                entry = readme_for(tree, rel, cache)
                if rel in EXCLUDE or entry is None or not is_free(entry.licence):
                    continue
                if is_duplicate(src, seen):
                    print(f"skipping duplicate photo {rel}", file=sys.stderr)
                    continue
                name = stem_name(rel)
                to_jpeg(src, photos / cls / name)
                chosen[cls].append((name, entry))
    write_attribution(chosen, version)
    return chosen, seen


def build_heldout(tree: Path, dest: Path, seen: list[np.ndarray]) -> dict[str, int]:
    """Photos of the same classes that are not in the bundle (any licence; local use only).

    ``seen`` holds the bundle's fingerprints, so a photo that is also in the bundle is skipped.
    """
    if dest.exists():
        shutil.rmtree(dest)
    cache: dict = {}
    lines = []
    picks: dict[str, list[Path]] = {"animals": [], "landmarks": []}
    for src in candidates(tree, f"{ACT}/erase/resource", None):
        entry = readme_for(tree, src.relative_to(tree).as_posix(), cache)
        if entry and not is_free(entry.licence):
            picks["animals"].append(src)
    picks["animals"].append(tree / f"{ACT}/explore_world_animals/resource/animals/narwhal.webp")
    for src in candidates(tree, EXPLORE_MON, None):
        rel = src.relative_to(tree).as_posix()
        entry = readme_for(tree, rel, cache)
        in_bundle = src in candidates(tree, EXPLORE_MON, "even") and entry and is_free(entry.licence)
        if not in_bundle and rel not in EXCLUDE:
            picks["landmarks"].append(src)
    for stem in DETAILS_LANDMARKS:
        picks["landmarks"].append(tree / f"{ACT}/details/resource/image/{stem}_background.webp")
    counts = {}
    for cls, files in picks.items():
        files = [src for src in files if not is_duplicate(src, seen)]
        for src in files:
            rel = src.relative_to(tree).as_posix()
            entry = readme_for(tree, rel, cache)
            to_jpeg(src, dest / cls / stem_name(rel))
            lic = entry.licence if entry else "see details/resource/image/README"
            lines.append(f"{cls}/{stem_name(rel)}\t{lic}\t{entry.source if entry else ''}")
        counts[cls] = len(files)
    (dest / "SOURCES.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


def write_attribution(chosen: dict[str, list[tuple[str, Entry]]], version: str) -> None:
    total = sum(len(v) for v in chosen.values())
    out = [
        "# Sample photos: sources and licences",
        "",
        f"The {total} photos under `photos/` are taken from the Debian package "
        f"`{PACKAGE}` version {version} (Debian bookworm; upstream GCompris 3.1, "
        "https://gcompris.net), where they are stored in the Qt resource bundles "
        "`/usr/share/gcompris-qt/rcc/<activity>.rcc`.",
        "",
        "Every photo here is, according to the per-file `README` that GCompris ships next to it, "
        "either in the **Public Domain** or released under **CC0-1.0** "
        "(https://creativecommons.org/publicdomain/zero/1.0/). "
        "Files listed under any other licence (CC-BY, CC-BY-SA, GPL, ...) were not used. "
        "The author and source given below are copied from those READMEs; "
        "GCompris had already cropped/rescaled some originals.",
        "",
        "Note on `debian/copyright`: the package's `/usr/share/doc/gcompris-qt-data/copyright` is "
        "out of date for these folders. It describes older upstream images (`.jpg`/`.png` files with "
        "other names, authors and licences, e.g. `fishes/fish1.jpg` = a stingray, and a GPL-3 "
        "wildcard for `explore_farm_animals/resource/animals/*` written when that folder held "
        "drawings and sounds). The shipped files are the newer `.webp` photos, and the `README` "
        "inside each `.rcc`, next to them, is the statement that matches them (same subjects, "
        "per-file Wikimedia Commons / publicdomainpictures.net / maxpixel source pages).",
        "",
        "Changes made by us: decoded from WebP, alpha (if any) flattened onto white, "
        f"resized with Lanczos so that the longest side is at most {MAX_SIDE} px, "
        f"re-encoded as JPEG (quality {QUALITY}, no metadata), renamed "
        "(`<activity>_<original name>.jpg`).",
        "",
        "Reproduce with `python tools/make_sample_data.py` "
        "(unpacks the `.rcc` bundles with `tools/extract_gcompris_rcc.py`).",
        "",
        "Activity prefixes: `cat_` categorization, `world_` explore_world_animals, "
        "`farm_` explore_farm_animals, `erase_` erase, `mon_` explore_monuments.",
        "",
    ]
    for cls, items in chosen.items():
        out += [
            f"## {cls} ({len(items)} photos)",
            "",
            "| file | licence | author | source |",
            "|---|---|---|---|",
        ]
        for name, e in items:
            author = e.author.replace("|", "/")
            out.append(f"| {name} | {e.licence} | {author} | {e.source} |")
        out.append("")
    (OUT / "ATTRIBUTION.md").write_text("\n".join(out), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Rebuild the bundled sample photos from gcompris-qt-data.")
    ap.add_argument("--deb", type=Path, help="use this .deb instead of running apt-get download")
    ap.add_argument("--heldout", type=Path, help="also write a held-out test set here (outside the repo)")
    ap.add_argument("--keep", type=Path, help="unpack into this folder and keep it (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root, version = fetch_deb(work, args.deb.resolve() if args.deb else None)
        if version != EXPECTED_VERSION:
            print(
                f"warning: {PACKAGE} {version}, the selection was made on {EXPECTED_VERSION}", file=sys.stderr
            )
        tree = work / "rcc"
        unpack(root, tree)
        chosen, seen = build_bundle(tree, version)
        for cls, items in chosen.items():
            print(f"{cls}: {len(items)}")
        if args.heldout:
            for cls, n in build_heldout(tree, args.heldout, seen).items():
                print(f"held-out {cls}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
