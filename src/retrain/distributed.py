"""Feature extraction on a Ray cluster: ``retrain extract --engine ray`` and ``retrain --engine ray``.

The sorted file list is cut into chunks (``--chunk_size`` files) and becomes a Ray Dataset
with one row per chunk still to do. Ray Data runs two stages over it:

1. reading + decoding, in CPU tasks: each file's bytes are read once (fsspec), hashed for
   the content key and decoded by :func:`retrain.images.decode_image`, exactly as the local
   path does; duplicate contents inside a chunk are decoded once;
2. the backbone, in an actor pool: one actor per GPU, or CPU actors running the same ONNX
   model as the local path through ONNX Runtime with one thread each. Each actor writes its
   chunk's shard (:mod:`retrain.shards`) itself, so features never pass through the driver.

Keys are content and shard names are chunk identities, so retrying a chunk (Ray retries
the tasks and restarts the actors of a worker that died) rewrites the same shard, and a
rerun skips every chunk whose shard exists. With the same engine a feature computed here
is bitwise the one the local run computes (tests/test_distributed.py checks it).

Ray is an optional dependency: ``pip install 'retrain[ray]'``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from retrain.backbones import BackboneSpec
from retrain.cache import content_key
from retrain.errors import RetrainError
from retrain.images import ImageError, decode_image, is_image_file_name, read_image_bytes
from retrain.shards import (
    chunk_id,
    filesystem,
    finished_chunks,
    is_local,
    join,
    shard_name,
    shard_table,
    write_shard,
)

log = logging.getLogger("retrain")

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install 'retrain[ray]'"
DEFAULT_CHUNK = 256  # files per shard: ~1.3 MB of features, ~38 MB of 224 px pixels in flight per chunk


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RetrainError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass
class ExtractReport:
    """What a cluster extraction did; ``skipped`` maps unusable files to the reason."""

    directory: str  # the namespace folder (URL) holding the shards
    namespace: str
    files: int = 0
    chunks: int = 0
    chunks_done_before: int = 0  # finished by an earlier run: skipped
    computed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    workers: int = 0
    seconds: float = 0.0
    chunk_ids: list[str] = field(default_factory=list)  # every chunk of this file list, done before or now
    steady_seconds: float = 0.0  # from the first chunk's result to the last: the pipeline full, no start-up
    steady_computed: int = 0  # images computed in that time (all chunks but the first)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds and self.computed else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """The rate once every actor is up (Ray's and the actors' start-up left out)."""
        return self.steady_computed / self.steady_seconds if self.steady_seconds else 0.0


# -- the file list --------------------------------------------------------------------------------
def list_images(image_dir: str) -> list[tuple[str, int, str]]:
    """(path, size, mtime) of every image below a folder or URL, sorted; hidden names left out as locally."""
    fs, root = filesystem(image_dir)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        raise RetrainError(
            f"--image_dir {image_dir!r} has no files (or does not exist); give a folder of images"
        )
    out = []
    root = root.rstrip("/")
    for path, info in found.items():
        rel = path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")) or not is_image_file_name(path):
            continue
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("ETag") or ""
        out.append(
            (fs.unstrip_protocol(path) if not is_local(fs) else path, int(info.get("size") or 0), str(mtime))
        )
    return sorted(out)


def local_files(paths: Sequence[str]) -> list[tuple[str, int, str]]:
    """(absolute path, size, mtime_ns) of local files; an unreadable one gets size -1 (its worker says why)."""
    out = []
    for p in paths:
        ap = os.path.abspath(p)
        try:
            st = os.stat(ap)
            out.append((ap, st.st_size, str(st.st_mtime_ns)))
        except OSError:
            out.append((ap, -1, ""))
    return out


def plan_chunks(
    files: Sequence[tuple[str, int, str]], namespace: str, chunk_size: int
) -> list[tuple[str, list]]:
    if chunk_size < 1:
        raise RetrainError(f"--chunk_size must be at least 1, got {chunk_size}")
    files = sorted(files)
    return [
        (chunk_id(namespace, files[i : i + chunk_size]), [f[0] for f in files[i : i + chunk_size]])
        for i in range(0, len(files), chunk_size)
    ]


# -- stage 1: read + decode (Ray tasks) -----------------------------------------------------------
def _read(path: str) -> bytes:
    if "://" not in path:
        return read_image_bytes(path)  # the local path's checks: regular file, size limit, FIFO-safe
    fs, inner = filesystem(path)
    try:
        return fs.cat_file(inner)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc}") from exc


def decode_chunk(row: dict, *, size: int, resample: str) -> dict:
    """One chunk's files -> content keys, reasons and the pixels of each distinct content."""
    keys, reasons, pixels, seen = [], [], [], set()
    for path in row["paths"]:
        try:
            data = _read(path)
            key = content_key(data)
            if key not in seen:
                pixels.append(decode_image(data, size, resample=resample))
                seen.add(key)
        except ImageError as exc:
            keys.append(None)
            reasons.append(exc.reason)
            continue
        keys.append(key)
        reasons.append(None)
    block = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return {
        "cid": row["cid"],
        "paths": list(row["paths"]),
        "keys": keys,
        "reasons": reasons,
        "pixels": block.tobytes(),
        "n": len(pixels),
    }


# -- stage 2: the backbone (Ray actors) -----------------------------------------------------------
class ChunkEmbedder:
    """Runs the backbone on decoded chunks and writes each chunk's shard."""

    def __init__(
        self,
        model: str,
        *,
        size: int,
        feature_dim: int,
        directory: str,
        namespace: str,
        batch_size: int,
        device: str,
    ):
        if device == "cuda":
            raise RetrainError(
                "GPU actors run the float32 PyTorch backbone: use `retrain --engine ray --device cuda`"
            )
        from retrain.engines import OnnxEngine

        self.fs, self.directory = filesystem(directory)
        with filesystem(model)[0].open(filesystem(model)[1], "rb") as f:
            self.engine = OnnxEngine(f.read(), threads=1)  # one core per actor, as one local worker thread
        self.size, self.dim, self.batch = size, feature_dim, batch_size
        self.namespace = namespace

    def __call__(self, batch: dict) -> dict:
        out = {"cid": [], "files": [], "computed": [], "skipped_paths": [], "skipped_reasons": []}
        for i in range(len(batch["cid"])):
            row = {k: batch[k][i] for k in batch}
            computed, skipped = self._chunk(row)
            out["cid"].append(str(row["cid"]))
            out["files"].append(len(row["paths"]))
            out["computed"].append(computed)
            out["skipped_paths"].append([p for p, _ in skipped])
            out["skipped_reasons"].append([r for _, r in skipped])
        return out

    def _chunk(self, row: dict) -> tuple[int, list[tuple[str, str]]]:
        n, s = int(row["n"]), self.size
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(n, s, s, 3)  # (n, H, W, 3), distinct contents
        feats = np.empty((n, self.dim), np.float32)
        for i in range(0, n, self.batch):
            feats[i : i + self.batch] = self.engine(pixels[i : i + self.batch])
        keys = [None if k is None else bytes(k) for k in row["keys"]]
        row_of: dict[bytes, int] = {}
        for k in keys:
            if k is not None and k not in row_of:
                row_of[k] = len(row_of)
        zero = np.zeros(self.dim, np.float32)
        table = np.stack([feats[row_of[k]] if k is not None else zero for k in keys]) if keys else feats
        paths = [str(p) for p in row["paths"]]
        write_shard(
            self.fs,
            join(self.directory, shard_name(str(row["cid"]))),
            shard_table(paths, keys, table, list(row["reasons"]), namespace=self.namespace),
        )
        return n, [(p, r) for p, r in zip(paths, row["reasons"]) if r is not None]


# -- the driver -----------------------------------------------------------------------------------
def connect(address: str | None):
    """ray.init for ``address`` (None: a Ray instance on this machine); reuses an open connection."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=address or None, log_to_driver=False, include_dashboard=False, configure_logging=False
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RetrainError(
                f"cannot connect to the Ray cluster at {address!r}: {exc}. Start it with "
                "`ray start --head` (and `ray start --address HEAD:6379` on the others), or "
                "leave --ray_address out to run Ray on this machine only"
            ) from None
    return ray


def default_workers(ray) -> int:
    """CPU actors: every cluster CPU but one in eight (at least one), which decodes."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus - max(1, math.ceil(cpus / 8)))


def extract_on_ray(
    files: Sequence[tuple[str, int, str]],
    spec: BackboneSpec,
    bottleneck_dir: str,
    *,
    precision: str = "float32",
    model_dir=None,
    address: str | None = None,
    workers: int = 0,
    batch_size: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> ExtractReport:
    """Features of ``files`` ((path or URL, size, mtime) from :func:`list_images` or :func:`local_files`)
    as Parquet shards under ``bottleneck_dir``/<namespace>; finished chunks are skipped."""
    from retrain.engines import AUTO_BATCH
    from retrain.features import progress_bar
    from retrain.precision import backbone_model_path, feature_namespace

    require_ray()
    t0 = time.perf_counter()
    namespace = feature_namespace(spec, precision, model_dir)
    fs, root = filesystem(bottleneck_dir)
    directory = join(bottleneck_dir.rstrip("/"), namespace)
    inner = join(root, namespace)
    fs.makedirs(inner, exist_ok=True)
    chunks = plan_chunks(files, namespace, chunk_size)
    done = finished_chunks(fs, inner)
    todo = [(cid, paths) for cid, paths in chunks if cid not in done]
    report = ExtractReport(
        directory=directory,
        namespace=namespace,
        files=len(files),
        chunks=len(chunks),
        chunks_done_before=len(chunks) - len(todo),
        chunk_ids=[c for c, _ in chunks],
    )
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report
    ray = connect(address)
    n = workers or default_workers(ray)
    report.workers = n
    model = _publish_model(fs, inner, directory, backbone_model_path(spec, precision, model_dir).read_bytes())
    _quiet_ray(ray, progress)
    size, resample = spec.preprocessing.input_size, spec.preprocessing.resample
    ds = ray.data.from_items([{"cid": c, "paths": p} for c, p in todo], override_num_blocks=len(todo))
    # Tasks (Ray retries one whose worker dies). Their memory request, a chunk's pixels twice over plus room for
    # decoding, also keeps Ray Data from fusing them into the actors: decoding stays off the backbone's cores.
    memory = 2 * chunk_size * size * size * 3 + 256 * 2**20
    ds = ds.map(decode_chunk, fn_kwargs={"size": size, "resample": resample}, num_cpus=1, memory=memory)
    ds = ds.map_batches(
        ChunkEmbedder,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=1,
        fn_constructor_kwargs={
            "model": model,
            "size": size,
            "feature_dim": spec.feature_dim,
            "directory": directory,
            "namespace": namespace,
            "batch_size": batch_size or AUTO_BATCH["cpu"],
            "device": "cpu",
        },
    )
    bar = progress_bar(sum(len(p) for _, p in todo), progress)
    try:
        first = None
        for row in ds.iter_rows():
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                report.steady_computed += int(row["computed"])
                report.steady_seconds = now - first
            report.computed += int(row["computed"])
            report.skipped.update(zip(row["skipped_paths"], row["skipped_reasons"]))
            bar.update(int(row["files"]))
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _publish_model(fs, inner: str, directory: str, model: bytes) -> str:
    """Put the backbone next to the shards, where every node can read it; its URL (named by content)."""
    import hashlib

    name = f"backbone-{hashlib.sha256(model).hexdigest()[:16]}.onnx"
    if not fs.exists(join(inner, name)):
        with fs.open(join(inner, f".{name}.{os.getpid()}.tmp"), "wb") as f:
            f.write(model)
        fs.mv(join(inner, f".{name}.{os.getpid()}.tmp"), join(inner, name))
    return join(directory, name)


def _quiet_ray(ray, progress: bool) -> None:
    """Ray Data's own progress lines only when retrain shows a bar; our log stays readable."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(
        logging.INFO if progress and os.environ.get("RETRAIN_DEBUG") else logging.WARNING
    )


# -- the hook of `retrain --engine ray` / `--extraction_precision int8` ---------------------------
def features_for_run(cfg, spec: BackboneSpec, dataset):
    """``train()``'s features stage for a Ray run or a non-default precision: a FeatureTable with a store."""
    paths = [r.path for r in dataset.records]
    distorted = cfg.flip_left_right or cfg.random_crop or cfg.random_scale or cfg.random_brightness
    if cfg.extraction_precision != "float32" and (distorted or cfg.fine_tune):
        # Distortions and fine-tuning run the float32 backbone: their features would not match int8 ones.
        raise RetrainError(
            f"--extraction_precision {cfg.extraction_precision} does not combine with distortions "
            "or --fine_tune yet; leave one of them out"
        )
    if cfg.engine == "ray":
        return ray_features(cfg, spec, paths)
    if cfg.engine != "local":
        raise RetrainError(f"--engine must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    return _local_table(
        paths,
        spec,
        cfg.bottleneck_dir,
        precision=cfg.extraction_precision,
        model_dir=cfg.model_dir or None,
        workers=cfg.num_workers,
        batch_size=cfg.batch_size,
        progress=not cfg.quiet,
        device=cfg.device,
    )


def ray_features(cfg, spec: BackboneSpec, paths: Sequence[str]):
    """Extract ``paths`` on Ray; the FeatureTable's store gathers rows from the shards into a memory map."""
    from retrain.feature_cache import cache_root
    from retrain.features import FeatureTable
    from retrain.shards import ShardFeatures, iter_shards

    if cfg.device == "cuda":
        raise RetrainError(
            "--engine ray runs CPU actors with ONNX Runtime; GPU actors are not built yet: "
            "use --device auto or cpu"
        )
    report = extract_on_ray(
        local_files(paths),
        spec,
        str(cache_root(cfg.bottleneck_dir)),
        precision=cfg.extraction_precision,
        model_dir=cfg.model_dir or None,
        address=cfg.ray_address or None,
        workers=cfg.num_workers,
        batch_size=cfg.batch_size,
        progress=not cfg.quiet,
    )
    original = {os.path.abspath(p): p for p in paths}
    table = FeatureTable(computed=report.computed, seconds=report.seconds)
    fs, inner = filesystem(report.directory)
    for shard in iter_shards(fs, inner, report.chunk_ids, feature_dim=spec.feature_dim, with_features=False):
        for p, k, r in zip(shard.paths, shard.keys, shard.reasons):
            if p in original:
                if k is None:
                    table.skipped[original[p]] = r
                else:
                    table.keys[original[p]] = k
    table.keys = {p: table.keys[p] for p in paths if p in table.keys}
    table.cached = max(0, len(table.keys) - table.computed)
    table.store = ShardFeatures(report.directory, spec.feature_dim, report.chunk_ids)
    return table


# -- `retrain extract` ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from retrain.backbones import available_backbones
    from retrain.cli import _add, _Parser
    from retrain.precision import PRECISIONS

    p = _Parser(
        prog="retrain extract",
        description="Compute the bottleneck features of every image below "
        "--image_dir into --bottleneck_dir, on this machine or a Ray cluster, so that a later `retrain` "
        "on the same photos starts warm. Reruns skip finished work.",
    )
    _add(
        p,
        "image_dir",
        required=True,
        help="folder (or fsspec URL with --engine ray) of images, searched recursively",
    )
    _add(
        p,
        "bottleneck_dir",
        default="",
        help="feature cache folder or URL (default ~/.cache/retrain/bottlenecks)",
    )
    _add(
        p, "architecture", default="efficientnet_lite0", help=f"backbone: {', '.join(available_backbones())}"
    )
    _add(
        p,
        "model_dir",
        default="",
        help="where the exported backbone is cached (default ~/.cache/retrain/models)",
    )
    _add(
        p,
        "engine",
        default="ray",
        choices=list(ENGINES),
        help="ray: a Ray cluster; local: this machine's cores",
    )
    _add(
        p,
        "ray_address",
        default="",
        help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: Ray on this machine only)",
    )
    _add(
        p,
        "extraction_precision",
        default="float32",
        choices=list(PRECISIONS),
        help="int8: a quantized backbone, faster on CPUs with VNNI (its own cache namespace; docs/scale.md)",
    )
    _add(
        p, "num_workers", type=int, default=0, help="backbone actors on Ray / threads locally (0 = automatic)"
    )
    _add(p, "batch_size", type=int, default=0, help="images per forward pass (0 = automatic)")
    _add(
        p,
        "chunk_size",
        type=int,
        default=DEFAULT_CHUNK,
        help="files per Parquet shard (the unit of retry and resume)",
    )
    _add(p, "quiet", action="store_true", help="no progress bar")
    return p


def extract(
    image_dir: str,
    bottleneck_dir: str = "",
    *,
    architecture: str = "efficientnet_lite0",
    engine: str = "ray",
    **kw,
) -> ExtractReport:
    """Library form of ``retrain extract``."""
    from retrain.backbones import get_backbone
    from retrain.feature_cache import cache_root

    spec = get_backbone(architecture)
    bottleneck_dir = bottleneck_dir or str(cache_root())
    if engine == "ray":
        require_ray()
        files = list_images(image_dir) if "://" in image_dir else local_files(_local_images(image_dir))
        return extract_on_ray(files, spec, bottleneck_dir, **kw)
    if engine != "local":
        raise RetrainError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return _extract_local(_local_images(image_dir), spec, bottleneck_dir, **kw)


def _local_images(image_dir: str) -> list[str]:
    if "://" in image_dir:
        raise RetrainError(f"--engine local reads local folders; for {image_dir!r} use --engine ray")
    return [p for p, _, _ in list_images(image_dir)]


def _local_table(
    paths,
    spec,
    bottleneck_dir,
    *,
    precision="float32",
    model_dir=None,
    workers=0,
    batch_size=0,
    progress=True,
    device="auto",
):
    from retrain.feature_cache import open_store
    from retrain.features import compute_features
    from retrain.precision import engine_kind, make_extraction_engine

    if precision == "float32":
        from retrain.engines import engine_kind as float_kind

        kind = float_kind(device)
    else:
        kind = engine_kind(spec, precision, model_dir)
    store = open_store(spec, bottleneck_dir or None, engine=kind)
    table = compute_features(
        paths,
        spec,
        store,
        batch_size=batch_size,
        workers=workers or None,
        progress=progress,
        engine_factory=lambda: make_extraction_engine(
            spec, precision=precision, device=device, model_dir=model_dir, workers=workers or None
        ),
    )
    table.store = store
    store.compact()
    return table


def _extract_local(
    paths,
    spec,
    bottleneck_dir,
    *,
    precision="float32",
    model_dir=None,
    workers=0,
    batch_size=0,
    progress=True,
    address=None,
    chunk_size=DEFAULT_CHUNK,
) -> ExtractReport:
    del address, chunk_size  # Ray-only settings
    table = _local_table(
        paths,
        spec,
        bottleneck_dir,
        precision=precision,
        model_dir=model_dir,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
    )
    return ExtractReport(
        directory=str(table.store.directory),
        namespace=table.store.directory.name,
        files=len(paths),
        computed=table.computed,
        skipped=table.skipped,
        seconds=table.seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from retrain.cli import _run, setup_logging

    ns = _parser().parse_args(argv)
    setup_logging("INFO")

    def go() -> int:
        r = extract(
            ns.image_dir,
            ns.bottleneck_dir,
            architecture=ns.architecture,
            engine=ns.engine,
            precision=ns.extraction_precision,
            model_dir=ns.model_dir or None,
            address=ns.ray_address or None,
            workers=ns.num_workers,
            batch_size=ns.batch_size,
            chunk_size=ns.chunk_size,
            progress=not ns.quiet,
        )
        for path, reason in sorted(r.skipped.items()):
            log.warning("Skipped %s: %s", path, reason)
        log.info(
            "%d files: %d features computed in %.1f s (%.1f images/s, %d workers), %d of %d chunks done "
            "before; features in %s",
            r.files,
            r.computed,
            r.seconds,
            r.images_per_second,
            r.workers,
            r.chunks_done_before,
            r.chunks,
            r.directory,
        )
        return 0

    return _run(go)
