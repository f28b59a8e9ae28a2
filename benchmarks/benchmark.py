#!/usr/bin/env python3
"""How fast is retrain? One command, one table, against a plain PyTorch pipeline on the same photos.

    python benchmarks/benchmark.py                 # ~2,600 photos, cold + warm, PyTorch baseline, 10,000-image RSS run
    python benchmarks/benchmark.py --quick         # smoke run, under 2 minutes
    python benchmarks/benchmark.py --image_dir DIR # your own folder of class sub-folders
    python benchmarks/benchmark.py --download-flowers  # TensorFlow's flower_photos (needs the internet)

What it measures (every figure in one invocation, so the ratios compare like with like):

* ``retrain`` end to end, as a subprocess (process start to exit), first with an empty
  bottleneck cache (cold) and then again with every feature cached (warm); its peak RSS;
  the bottleneck-extraction rate from the run's ``metrics.json``; its final test accuracy.
* A plain PyTorch pipeline over the same files, also as a subprocess: PIL decode and
  resize per image, batches of 32 through the eager model built from the same packaged
  weights, then a softmax-regression head on those features (same train/test split).
* The compute floor: the backbone's GFLOPs per image (``2 * spec.gmacs``) divided by the
  float32 GFLOP/s of a large NumPy matrix product measured in the same run.
* Optionally (``--rss_images``, default 10,000 unless ``--quick``) a cold run over that many
  distinct photos, for peak memory, and the time to load all their cached features.

Without ``--image_dir`` the photo set is built from the real photos bundled with retrain
(``retrain/sample_data/photos``, 143 photos in 4 folders): animals + fish become class
``animals``, landmarks + tools become class ``man_made``, and each photo gives several
300x300 variants (random crop of 45-100% of its area, aspect jitter, mirror, JPEG quality
82-94). Variants are named ``<photo>_nohash_<n>.jpg``, so all variants of one photo fall in
the same split and the test accuracy is measured on photos the head never saw.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# Bundled sample classes -> benchmark class: two classes of real photos.
CLASS_OF = {"animals": "animals", "fish": "animals", "landmarks": "man_made", "tools": "man_made"}
PHOTO_SET_VERSION = 1


# -- data ------------------------------------------------------------------------------------------
def build_photo_set(
    out_dir: str | os.PathLike,
    n_images: int,
    *,
    size: int = 300,
    seed: int = 0,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """A folder ``out_dir/<class>/*.jpg`` of ``n_images`` distinct ``size``x``size`` JPEG variants of real photos.

    ``source_dir`` (default: retrain's bundled sample photos) has one sub-folder per source
    class; see ``CLASS_OF`` for how the bundled folders map onto the two benchmark classes.
    Folders not in ``CLASS_OF`` keep their own name. Reuses a matching set built earlier.
    """
    from PIL import Image

    if source_dir is None:
        from retrain.sample_data import sample_image_dir

        source_dir = sample_image_dir()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    recipe = {
        "version": PHOTO_SET_VERSION,
        "n": n_images,
        "size": size,
        "seed": seed,
        "source": str(source_dir),
    }
    marker = out_dir / ".benchmark-photos.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    sources: dict[str, list[Path]] = {}
    for folder in sorted(p for p in source_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        sources.setdefault(CLASS_OF.get(folder.name, folder.name), []).extend(files)
    if len(sources) < 2:
        raise SystemExit(f"need at least two class folders of photos under {source_dir}")
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    per_class = _split_evenly(n_images, len(sources))
    for (label, files), count in zip(sorted(sources.items()), per_class):
        (out_dir / label).mkdir(parents=True)
        photos = [Image.open(f).convert("RGB") for f in files]
        for i in range(count):
            k = i % len(files)
            while True:  # distinct bytes, so the content-keyed cache cannot share any entry
                data = _variant(photos[k], size, rng)
                digest = hashlib.sha1(data).digest()
                if digest not in seen:
                    seen.add(digest)
                    break
            stem = f"{files[k].parent.name}_{files[k].stem}"
            (out_dir / label / f"{stem}_nohash_{i:05d}.jpg").write_bytes(data)
    marker.write_text(json.dumps(recipe))
    return out_dir


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _variant(photo, size: int, rng: np.random.Generator) -> bytes:
    """A random crop (45-100% of the area, aspect 3:4..4:3), maybe mirrored, resized and JPEG-encoded."""
    from PIL import Image

    w, h = photo.size
    area = w * h * rng.uniform(0.45, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x, y, x + cw, y + ch)).resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(82, 95)))
    return buf.getvalue()


def download_flowers(dest: str | os.PathLike) -> Path:
    """TensorFlow's flower_photos (3,670 photos, 5 classes, CC-BY), downloaded once into ``dest``."""
    dest = Path(dest)
    folder = dest / "flower_photos"
    if (folder / "roses").is_dir():
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "flower_photos.tgz"
    if not archive.exists():
        print(f"downloading {FLOWERS_URL} ...", file=sys.stderr)
        partial = archive.with_suffix(".part")
        urllib.request.urlretrieve(FLOWERS_URL, partial)  # noqa: S310 - fixed https URL
        partial.replace(archive)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4: check the members ourselves
            for member in tar.getmembers():
                if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                    raise SystemExit(f"refusing to extract unsafe path {member.name!r} from {archive}")
            tar.extractall(dest)  # noqa: S202 - members checked above
    license_file = folder / "LICENSE.txt"
    if license_file.exists():  # a file in the root would not be a class, but keep the folder clean
        license_file.rename(dest / "flower_photos-LICENSE.txt")
    return folder


def count_images(image_dir: str | os.PathLike) -> int:
    from retrain.images import is_image_file_name

    return sum(is_image_file_name(p.name) for p in Path(image_dir).rglob("*") if p.is_file())


# -- machine ---------------------------------------------------------------------------------------
def matmul_gflops(n: int = 2048, repeats: int = 7) -> tuple[float, float]:
    """Float32 GFLOP/s of an ``n`` x ``n`` NumPy matrix product, best of ``repeats``: per wall second
    (all cores together) and per CPU second (one core's rate, which the machine's other tenants
    cannot stretch the way they stretch wall time)."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return 2 * n**3 / best_wall / 1e9, 2 * n**3 / best_cpu / 1e9


def cpu_steal() -> tuple[int, int] | None:
    """(steal, total) jiffies from /proc/stat: time the hypervisor gave this VM's CPUs to others."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_fraction(before, after) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def floor_ms_per_image(gmacs: float, gflops: float) -> float:
    """Milliseconds per image if the backbone ran at the matrix-product rate: 2 FLOPs per multiply-add."""
    return 2 * gmacs / gflops * 1000


# -- measured runs ----------------------------------------------------------------------------------
@dataclass
class ProcessRun:
    """One subprocess: wall seconds from start to exit, peak RSS, exit code, captured output, CPU seconds."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str
    cpu_seconds: float = 0.0  # user + system, all threads: shows when other load stretched the wall time


def run_process(cmd: list[str], *, cwd: str | os.PathLike | None = None, timeout: float = 3600) -> ProcessRun:
    """Run ``cmd`` and measure it alone: ``os.wait4`` gives this child's own peak RSS (no psutil needed)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
    rss_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20  # KiB on Linux
    return ProcessRun(seconds, rss_mb, proc.returncode, output, usage.ru_utime + usage.ru_stime)


@dataclass
class RetrainRun:
    seconds: float  # end to end: process start to exit
    peak_rss_mb: float
    extraction_seconds: float  # the features stage, from metrics.json
    computed: int  # bottlenecks computed (0 when warm)
    cached: int
    test_accuracy: float | None
    stage_seconds: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0
    extraction_cpu_seconds: float = float("nan")  # all threads, from metrics.json
    steal: float | None = None  # share of the CPUs' time the hypervisor gave to other machines

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.extraction_seconds / self.computed if self.computed else float("nan")

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.extraction_cpu_seconds / self.computed if self.computed else float("nan")


RETRAIN_CMD = [sys.executable, "-m", "retrain"]


def run_retrain(image_dir, bottleneck_dir, output_dir, *, extra_args=(), command=None) -> RetrainRun:
    """``retrain`` with default flags (plus ``extra_args``) as a subprocess; raises if it fails."""
    cmd = [
        *(command or RETRAIN_CMD),
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(bottleneck_dir),
        "--output_dir",
        str(output_dir),
        *extra_args,
    ]
    steal0 = cpu_steal()
    run = run_process(cmd)
    steal = steal_fraction(steal0, cpu_steal())
    if run.returncode != 0:
        raise RuntimeError(f"retrain failed (exit {run.returncode}):\n{run.output[-4000:]}")
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    # "Bottlenecks: 2600 computed in ... s (...), 0 reused ..." or "Bottlenecks: all 2600 reused ..."
    computed = re.search(r"^Bottlenecks: (\d+) computed", run.output, re.M)
    cached = re.search(r"^Bottlenecks: .*?(\d+) reused", run.output, re.M)
    computed, cached = int(computed[1]) if computed else 0, int(cached[1]) if cached else 0
    seconds = metrics.get("seconds", {})
    return RetrainRun(
        run.seconds,
        run.peak_rss_mb,
        seconds.get("features", float("nan")),
        computed,
        cached,
        metrics.get("test_accuracy"),
        seconds,
        run.cpu_seconds,
        metrics.get("cpu_seconds", {}).get("features", float("nan")),
        steal,
    )


def plain_pytorch_pipeline(
    image_dir,
    *,
    architecture: str = "efficientnet_lite0",
    batch_size: int = 32,
    head_steps: int = 300,
    seed: int = 0,
) -> dict:
    """The straightforward way: PIL decode + resize per image, eager PyTorch, softmax-regression head.

    Uses the same packaged weights and preprocessing as retrain and the same train/test split,
    so its accuracy is comparable. Returns timings and accuracy as a dict.
    """
    import torch
    from PIL import Image

    from retrain.backbones import get_backbone
    from retrain.data import TESTING, TRAINING, assign_splits, discover

    t_start = time.perf_counter()
    spec = get_backbone(architecture)
    pre = spec.preprocessing
    net = spec.build().eval()
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    resample = (
        Image.Resampling.BILINEAR
    )  # the straightforward way (retrain's default is its own fast_bilinear)
    dataset = assign_splits(discover(image_dir), validation_percentage=10, testing_percentage=10)
    records = dataset.records
    t0 = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(records), batch_size):
            pixels = [
                np.asarray(Image.open(r.path).convert("RGB").resize((pre.input_size,) * 2, resample))
                for r in records[i : i + batch_size]
            ]
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
            feats.append(net((x - mean) / std))
    extraction = time.perf_counter() - t0
    X = torch.cat(feats)  # (N, D)
    y = torch.tensor([r.label_index for r in records])
    train = torch.tensor([r.split == TRAINING for r in records])
    test = torch.tensor([r.split == TESTING for r in records])
    torch.manual_seed(seed)
    head = torch.nn.Linear(X.shape[1], len(dataset.labels))
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(head_steps):  # full batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(X[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((head(X[test]).argmax(1) == y[test]).float().mean()) if test.any() else None
    return {
        "images": len(records),
        "extraction_seconds": extraction,
        "test_accuracy": accuracy,
        "in_process_seconds": time.perf_counter() - t_start,
    }


@dataclass
class PlainRun:
    seconds: float
    peak_rss_mb: float
    extraction_seconds: float
    images: int
    test_accuracy: float | None
    cpu_seconds: float = 0.0

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.extraction_seconds / self.images


def run_plain_pytorch(image_dir, out_json, *, architecture: str = "efficientnet_lite0") -> PlainRun:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_plain_pytorch",
        str(out_json),
        "--image_dir",
        str(image_dir),
        "--architecture",
        architecture,
    ]
    run = run_process(cmd)
    if run.returncode != 0:
        raise RuntimeError(f"plain PyTorch pipeline failed (exit {run.returncode}):\n{run.output[-4000:]}")
    r = json.loads(Path(out_json).read_text())
    return PlainRun(
        run.seconds,
        run.peak_rss_mb,
        r["extraction_seconds"],
        r["images"],
        r["test_accuracy"],
        run.cpu_seconds,
    )


def store_load_seconds(
    bottleneck_dir, architecture: str = "efficientnet_lite0", repeats: int = 3
) -> tuple[float, int]:
    """Best time to open the bottleneck store and load every cached feature into memory, and how many."""
    from retrain.backbones import get_backbone
    from retrain.feature_cache import open_store

    spec = get_backbone(architecture)
    best, n = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        store = open_store(spec, bottleneck_dir)
        store.refresh()
        best, n = min(best, time.perf_counter() - t0), len(store)
    return best, n


# -- report ----------------------------------------------------------------------------------------
@dataclass
class Report:
    image_dir: str
    images: int
    architecture: str
    gflops: float
    gmacs: float
    gflops_per_core: float  # per CPU second
    cold: RetrainRun
    warm: RetrainRun
    plain: PlainRun | None = None
    big_images: int = 0
    big: RetrainRun | None = None
    store_load_seconds: float | None = None
    store_entries: int = 0
    machine: str = ""

    @property
    def floor_ms(self) -> float:
        return floor_ms_per_image(self.gmacs, self.gflops)

    @property
    def floor_cpu_ms(self) -> float:
        """CPU-milliseconds per image at one core's matrix-product rate."""
        return floor_ms_per_image(self.gmacs, self.gflops_per_core)


def _fmt(x, spec: str = ".1f", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:{spec}}{unit}"


def _pct(a) -> str:
    return "-" if a is None else f"{100 * a:.1f}%"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def make_table(r: Report) -> str:
    """The benchmark table (Markdown) plus the bars, each with its measured value."""
    c, w, p = r.cold, r.warm, r.plain
    rows = [
        (
            "extraction, images/s",
            _fmt(1000 / c.ms_per_image),
            _fmt(p and 1000 / p.ms_per_image),
            _ratio(p and p.ms_per_image, c.ms_per_image),
        ),
        (
            "extraction, ms/image",
            _fmt(c.ms_per_image, ".2f"),
            _fmt(p and p.ms_per_image, ".2f"),
            _ratio(c.ms_per_image, p and p.ms_per_image),
        ),
        ("compute floor, ms/image", _fmt(r.floor_ms, ".2f"), "", ""),
        (
            "extraction / floor",
            _ratio(c.ms_per_image, r.floor_ms),
            _ratio(p and p.ms_per_image, r.floor_ms),
            "",
        ),
        ("extraction, CPU-ms/image (all threads)", _fmt(c.cpu_ms_per_image, ".2f"), "", ""),
        ("compute floor, CPU-ms/image", _fmt(r.floor_cpu_ms, ".2f"), "", ""),
        ("extraction / floor, in CPU time", _ratio(c.cpu_ms_per_image, r.floor_cpu_ms), "", ""),
        (
            "end to end, cold, s",
            _fmt(c.seconds, ".2f"),
            _fmt(p and p.seconds, ".2f"),
            _ratio(c.seconds, p and p.seconds),
        ),
        ("end to end, warm, s", _fmt(w.seconds, ".2f"), "", _ratio(w.seconds, c.seconds) + " of cold"),
        (
            "CPU time (user+sys), cold, s",
            _fmt(c.cpu_seconds, ".1f"),
            _fmt(p and p.cpu_seconds, ".1f"),
            _ratio(c.cpu_seconds, p and p.cpu_seconds),
        ),
        ("CPU time (user+sys), warm, s", _fmt(w.cpu_seconds, ".1f"), "", ""),
        (
            "peak RSS, cold, MB",
            _fmt(c.peak_rss_mb, ".0f"),
            _fmt(p and p.peak_rss_mb, ".0f"),
            _ratio(c.peak_rss_mb, p and p.peak_rss_mb),
        ),
        ("peak RSS, warm, MB", _fmt(w.peak_rss_mb, ".0f"), "", ""),
        ("final test accuracy", _pct(c.test_accuracy), _pct(p and p.test_accuracy), ""),
    ]
    if r.big is not None:
        rows += [
            (f"peak RSS, cold, {r.big_images:,} images, MB", _fmt(r.big.peak_rss_mb, ".0f"), "", ""),
            (f"extraction, {r.big_images:,} images, images/s", _fmt(1000 / r.big.ms_per_image), "", ""),
            (f"load {r.store_entries:,} cached features, s", _fmt(r.store_load_seconds, ".3f"), "", ""),
        ]
    head = ["| figure | retrain | plain PyTorch | ratio |", "|---|---:|---:|---:|"]
    lines = [
        f"{r.images:,} images in {r.image_dir}; backbone {r.architecture} ({2 * r.gmacs:.3f} GFLOP/image); "
        f"float32 matmul {r.gflops:.1f} GFLOP/s ({r.gflops_per_core:.1f} per core); {r.machine}"
        + (f"; hypervisor steal during the cold run {100 * c.steal:.1f}%" if c.steal is not None else ""),
        "",
        *head,
        *(f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows),
        "",
        "retrain stages, cold (s): " + ", ".join(f"{k} {v:.2f}" for k, v in c.stage_seconds.items()),
        "retrain stages, warm (s): " + ", ".join(f"{k} {v:.2f}" for k, v in w.stage_seconds.items()),
        "",
        *format_bars(r),
    ]
    return "\n".join(lines)


def bars(r: Report) -> list[tuple[str, str, bool | None]]:
    """(bar, measured, met) for each target of the performance issue; ``None`` when not measured."""
    out = []
    p = r.plain
    out.append(
        (
            "cold end to end <= 0.25x plain PyTorch",
            _ratio(r.cold.seconds, p and p.seconds),
            (r.cold.seconds / p.seconds <= 0.25) if p else None,
        )
    )
    ratio = r.cold.ms_per_image / r.floor_ms if r.floor_ms else float("nan")
    out.append(
        (
            "extraction <= 1.5x compute floor",
            _ratio(r.cold.ms_per_image, r.floor_ms),
            bool(ratio <= 1.5) if np.isfinite(ratio) else None,
        )
    )
    out.append(
        (
            "warm end to end <= 10% of cold",
            f"{100 * r.warm.seconds / r.cold.seconds:.1f}%",
            r.warm.seconds / r.cold.seconds <= 0.10,
        )
    )
    big = r.big
    out.append(
        (
            f"peak RSS extracting {r.big_images or 10_000:,} images < 1.5 GB",
            f"{big.peak_rss_mb:.0f} MB" if big else "-",
            (big.peak_rss_mb < 1536) if big else None,
        )
    )
    out.append(
        (
            "cached features of 10,000 images load in < 1 s",
            f"{r.store_load_seconds:.3f} s ({r.store_entries:,})"
            if r.store_load_seconds is not None
            else "-",
            (r.store_load_seconds < 1.0) if r.store_load_seconds is not None else None,
        )
    )
    return out


def format_bars(r: Report) -> list[str]:
    word = {True: "met", False: "NOT met", None: "not measured"}
    return [
        "| bar | measured | |",
        "|---|---:|---|",
        *(f"| {b} | {m} | {word[ok]} |" for b, m, ok in bars(r)),
    ]


def machine_line() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f"load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; {load}"


# -- main ------------------------------------------------------------------------------------------
def ensure_backbone_export(architecture: str) -> float:
    """Export the backbone to ONNX once (as a first retrain run would); seconds it took (0 if cached)."""
    from retrain.backbones import get_backbone
    from retrain.export import backbone_onnx_path, default_model_dir

    spec = get_backbone(architecture)
    t0 = time.perf_counter()
    existed = any(default_model_dir().glob(f"{spec.name}-{spec.weights_id}-*.onnx"))
    backbone_onnx_path(spec)
    return 0.0 if existed else time.perf_counter() - t0


def run_benchmark(args: argparse.Namespace) -> Report:
    from retrain.backbones import get_backbone

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.image_dir:
        image_dir = Path(args.image_dir)
    elif args.download_flowers:
        image_dir = download_flowers(work / "downloads")
    else:
        image_dir = build_photo_set(work / f"photos-{args.images}", args.images)
    n_images = count_images(image_dir)
    spec = get_backbone(args.architecture)
    machine = machine_line()
    print(f"benchmark: {n_images} images in {image_dir}", file=sys.stderr)
    export_s = ensure_backbone_export(args.architecture)
    if export_s:
        print(
            f"one-time backbone export to ONNX: {export_s:.1f} s (not part of the runs below)",
            file=sys.stderr,
        )
    gflops, per_core = matmul_gflops()
    extra = ["--architecture", args.architecture]
    bottlenecks = work / "bottlenecks"
    shutil.rmtree(bottlenecks, ignore_errors=True)
    print("retrain, cold ...", file=sys.stderr)
    cold = run_retrain(image_dir, bottlenecks, work / "out-cold", extra_args=extra)
    # Again right after: the floor uses the machine's best, whatever the neighbours did meanwhile.
    gflops, per_core = (max(a, b) for a, b in zip((gflops, per_core), matmul_gflops()))
    print("retrain, warm ...", file=sys.stderr)
    warm = run_retrain(image_dir, bottlenecks, work / "out-warm", extra_args=extra)
    report = Report(
        str(image_dir), n_images, args.architecture, gflops, spec.gmacs, per_core, cold, warm, machine=machine
    )
    if not args.skip_pytorch:
        print("plain PyTorch pipeline ...", file=sys.stderr)
        report.plain = run_plain_pytorch(image_dir, work / "plain.json", architecture=args.architecture)
    if args.rss_images:
        big_dir = build_photo_set(work / f"photos-{args.rss_images}", args.rss_images, seed=1)
        big_bn = work / "bottlenecks-big"
        shutil.rmtree(big_bn, ignore_errors=True)
        print(f"retrain, cold, {args.rss_images} images ...", file=sys.stderr)
        report.big = run_retrain(big_dir, big_bn, work / "out-big", extra_args=extra)
        report.big_images = args.rss_images
        report.store_load_seconds, report.store_entries = store_load_seconds(big_bn, args.architecture)
        if not args.keep:
            shutil.rmtree(big_bn, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        report.machine += f", {os.getloadavg()[0]:.1f} at end"
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--image_dir", "--image-dir", default="", help="your own folder of class sub-folders")
    p.add_argument(
        "--download-flowers",
        "--download_flowers",
        action="store_true",
        help=f"download and use TensorFlow's flower_photos ({FLOWERS_URL})",
    )
    p.add_argument("--images", type=int, default=2600, help="size of the built photo set (default 2600)")
    p.add_argument(
        "--rss_images",
        type=int,
        default=None,
        help="also extract this many distinct images for peak RSS and cache load time "
        "(default 10000; 0 to skip)",
    )
    p.add_argument("--architecture", default="efficientnet_lite0")
    p.add_argument(
        "--work_dir",
        default=os.path.join(tempfile.gettempdir(), "retrain-benchmark"),
        help="photo sets, caches and run outputs (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="150 photos, no 10,000-image run: under 2 minutes")
    p.add_argument("--skip_pytorch", action="store_true", help="do not run the plain PyTorch pipeline")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the 10,000-image bottleneck cache")
    p.add_argument("--_plain_pytorch", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 150)
    if args.rss_images is None:
        args.rss_images = 0 if args.quick else 10_000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._plain_pytorch:  # the measured subprocess of run_plain_pytorch
        result = plain_pytorch_pipeline(args.image_dir, architecture=args.architecture)
        Path(args._plain_pytorch).write_text(json.dumps(result))
        return 0
    report = run_benchmark(args)
    print(make_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
