"""Stage 2: bottleneck features for every image, computed once and cached.

Every file gets a content key (SHA-1 of its bytes). Files seen before with the same
stat signature reuse their key from a small memo, so a warm run reads no image at all.
Only content missing from the cache is decoded and pushed through the backbone.

On the CPU the work is split by image, not inside the network: one worker thread per
core decodes a batch (Pillow releases the GIL) and then runs it through a shared ONNX
Runtime session with a single intra-op thread. Each core is always busy with either
decoding or arithmetic, no thread spins waiting for another, and decoding overlaps
with the other workers' inference. A CUDA GPU, when present, runs the network through
PyTorch, fed by many decoding threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.backbones import BackboneSpec
from retrain.cache import BottleneckStore, atomic_write_bytes, content_key, namespace_for
from retrain.images import DECODE_VERSION, ImageError, decode_image, read_image_bytes

log = logging.getLogger("retrain")

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    cuda = _cuda_available()
    if device == "cuda" and not cuda:
        from retrain.errors import RetrainError

        raise RetrainError("--device cuda was asked for, but PyTorch sees no CUDA GPU. Use --device auto or cpu.")
    return "cuda" if cuda else "cpu"


def _cuda_available() -> bool:
    # Only look if PyTorch is installed with CUDA; importing it costs seconds, so check cheaply first.
    if "torch" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False
        try:
            from importlib.metadata import version

            if "+cpu" in version("torch"):
                return False
        except Exception:  # noqa: BLE001 - metadata missing: fall through to the real check
            pass
        # A Linux machine with an NVIDIA driver has /dev/nvidiactl (WSL2: /dev/dxg); without either
        # CUDA cannot work, and importing a CUDA build of PyTorch to find that out takes seconds.
        if sys.platform == "linux" and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg")):
            return False
    import torch

    return torch.cuda.is_available()


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cache_namespace(spec: BackboneSpec) -> str:
    return namespace_for(
        backbone=spec.name,
        weights=spec.weights_id,
        preprocessing=spec.preprocessing.to_dict(),
        decoder=DECODE_VERSION,
    )


class OnnxEngine:
    """Runs a pixels->features (or pixels->probabilities) ONNX graph on the CPU.

    ``threads`` is ONNX Runtime's intra-op thread count (None: its default, all cores).
    ``concurrency`` is how many calls may run at once from different threads: a session's
    ``run`` is thread-safe, so one session serves every extraction worker.
    """

    def __init__(self, model_path: str | os.PathLike | bytes, threads: int | None = None, *, concurrency: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # ORT_ENABLE_ALL already fuses every Pad and Clip of the exported backbone into its Conv and runs
        # the convolutions in the blocked NCHWc layout; there is no Cast or Transpose left but the input's.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of convs: nothing to run in parallel
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        if threads and threads > 1 and concurrency > 1:
            # Other workers share the cores: threads spinning between ops would take them from decoding.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        src = model_path if isinstance(model_path, bytes) else os.fspath(model_path)
        self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.concurrency = concurrency

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


class TorchEngine:
    """Runs the backbone through PyTorch on a CUDA GPU (or CPU, for comparison).

    float32 on purpose: the features go into a cache shared with CPU runs, and a half-precision
    network would give different features under the same cache key. On a GPU this small network
    is not the bottleneck anyway; decoding JPEGs on the CPU is.
    """

    concurrency = 1  # one GPU stream; the decoding threads queue here

    def __init__(self, spec: BackboneSpec, device: str = "cuda", net=None):
        import torch

        from retrain.torch_modules import PixelsToFeatures

        self.torch = torch
        self.device = torch.device(device)
        module = PixelsToFeatures(net if net is not None else spec.build(), spec.preprocessing)
        self.module = module.eval().to(self.device)
        if self.device.type == "cuda":
            # NHWC input permuted to NCHW is already channels_last in memory: no copy on the way in.
            self.module = self.module.to(memory_format=torch.channels_last)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        # Fixed input size: let cuDNN pick its fastest kernels once. No TF32: it would change the
        # features (about 1e-3) under the same cache key as exact float32. Scoped, not global.
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):
            x = torch.from_numpy(pixels)  # (B, H, W, 3) uint8
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            return self.module(x).float().cpu().numpy()  # (B, D)


def extraction_plan(device: str, workers: int | None = None) -> tuple[int, int]:
    """(worker threads, ONNX Runtime threads per call) for feature extraction on ``device``.

    CPU: one worker per core, each running single-threaded inference, up to 8 workers (each
    holds one batch of activations); more cores than that go to intra-op threads.
    GPU: many decoding workers, since decoding on the CPU is what limits a GPU.
    """
    cores = cpu_cores()
    if device == "cuda":
        return (workers or min(32, cores)), 1
    n = workers or min(cores, 8)
    return n, max(1, cores // n)


def make_engine(spec: BackboneSpec, *, device: str = "auto", model_dir=None, threads: int | None = None,
                workers: int | None = None):
    """The fastest engine for ``device``: ONNX Runtime on the CPU, PyTorch on a CUDA GPU."""
    if resolve_device(device) == "cuda":
        return TorchEngine(spec, "cuda")
    from retrain.export import backbone_onnx_path

    n, per_call = extraction_plan("cpu", workers)
    return OnnxEngine(backbone_onnx_path(spec, model_dir), threads=threads or per_call, concurrency=n)


@dataclass
class FeatureTable:
    """Features for a list of files, aligned with the list; unreadable files are reported, not raised."""

    keys: dict[str, bytes] = field(default_factory=dict)  # path -> content key
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0


# -- content keys ----------------------------------------------------------------------------------
class FileKeyMemo:
    """Remembers each file's content key by its stat signature, so unchanged files are not read again.

    The signature is (absolute path, device, inode, size, mtime_ns, ctime_ns). ctime changes on every
    write and cannot be set back by a user (``touch -d`` and ``cp -p`` set mtime only), so an edited
    file always misses. A file changed within the filesystem's timestamp granularity of being hashed
    could keep its signature, so files modified less than ``RACY_SECONDS`` before the scan started are
    not remembered (git's "racily clean" rule). The memo is only ever a shortcut to a key: a damaged
    or foreign memo file is ignored, and a file that has changed is re-read.
    """

    FILE_NAME = "file-keys.bin"
    MAGIC = b"retrain-file-keys 1\n"
    RACY_SECONDS = 2.0  # FAT's mtime resolution; ext4/xfs/btrfs/APFS/NTFS are far finer
    MAX_ENTRIES = 1_000_000
    _RECORD = struct.Struct("<QQQqqH20s")  # dev, ino, size, mtime_ns, ctime_ns, len(path), key

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / self.FILE_NAME
        self._entries: dict[bytes, tuple[tuple[int, ...], bytes]] = self._load()
        self._added: dict[bytes, tuple[tuple[int, ...], bytes]] = {}
        self._horizon_ns = time.time_ns() - int(self.RACY_SECONDS * 1e9)

    @staticmethod
    def signature(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def lookup(self, name: bytes, sig: tuple[int, ...]) -> bytes | None:
        entry = self._entries.get(name)
        return entry[1] if entry is not None and entry[0] == sig else None

    def remember(self, name: bytes, sig: tuple[int, ...], key: bytes) -> None:
        if max(sig[3], sig[4]) < self._horizon_ns:
            self._added[name] = (sig, key)

    def save(self) -> None:
        """Write the memo if anything was added (atomic; concurrent runs: the last writer wins)."""
        if not self._added:
            return
        # Older entries first, this run's last, so trimming drops the oldest.
        merged = {name: e for name, e in self._entries.items() if name not in self._added}
        merged.update(self._added)
        if len(merged) > self.MAX_ENTRIES:
            merged = dict(list(merged.items())[-self.MAX_ENTRIES:])
        parts = [self.MAGIC]
        for name, (sig, key) in merged.items():
            parts += (self._RECORD.pack(*sig, len(name), key), name)
        body = b"".join(parts)
        with contextlib.suppress(OSError):  # a read-only cache still works, just without the shortcut
            atomic_write_bytes(self.path, body + hashlib.sha1(body).digest())
        self._entries, self._added = merged, {}

    def _load(self) -> dict[bytes, tuple[tuple[int, ...], bytes]]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return {}
        body, digest = data[:-20], data[-20:]
        if not body.startswith(self.MAGIC) or hashlib.sha1(body).digest() != digest:
            return {}
        entries, pos, rec = {}, len(self.MAGIC), self._RECORD
        try:
            while pos < len(body):
                dev, ino, size, mtime, ctime, n, key = rec.unpack_from(body, pos)
                pos += rec.size
                entries[body[pos:pos + n]] = ((dev, ino, size, mtime, ctime), key)
                pos += n
        except struct.error:
            return {}
        return entries


def _hash_file(path: str) -> tuple[bytes | None, str | None, tuple[int, ...] | None]:
    """(content key, None, stat signature taken before reading) or (None, reason, None)."""
    try:
        sig = FileKeyMemo.signature(os.stat(path))  # before reading: a later edit changes the signature
    except OSError:
        sig = None  # read_image_bytes says why
    try:
        return content_key(read_image_bytes(path)), None, sig
    except ImageError as exc:
        return None, exc.reason, None


def content_keys(paths: Sequence[str], memo: FileKeyMemo | None, table: FeatureTable, workers: int) -> None:
    """Fill ``table.keys`` (and ``table.skipped`` for unreadable files): memo hits by stat, the rest by hashing."""
    names: dict[str, bytes] = {}
    misses: list[str] = []
    for path in paths:
        key = None
        if memo is not None:
            with contextlib.suppress(OSError, ValueError):
                name = os.fsencode(os.path.abspath(path))
                names[path] = name
                key = memo.lookup(name, FileKeyMemo.signature(os.stat(path)))
        if key is None:
            misses.append(path)
        else:
            table.keys[path] = key
    if not misses:
        return
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="retrain-hash") as pool:
        for path, (key, reason, sig) in zip(misses, pool.map(_hash_file, misses)):
            if key is None:
                table.skipped[path] = reason
                continue
            table.keys[path] = key
            if memo is not None and sig is not None and path in names:
                memo.remember(names[path], sig, key)
    # Keep the table in the callers' order (memo hits were filled first).
    ordered = {p: table.keys[p] for p in paths if p in table.keys}
    table.keys.clear()
    table.keys.update(ordered)


# -- extraction ------------------------------------------------------------------------------------
def compute_features(
    paths: Sequence[str],
    spec: BackboneSpec,
    store: BottleneckStore,
    *,
    engine_factory: Callable[[], Callable[[np.ndarray], np.ndarray]],
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> FeatureTable:
    """Make sure every readable file in ``paths`` has its features in ``store``.

    ``workers``: extraction threads (default: one per core on the CPU). The engine's
    ``concurrency`` attribute (default 1) says how many of them may run it at once.
    """
    t0 = time.perf_counter()
    table = FeatureTable()
    memo = FileKeyMemo(store.directory)
    content_keys(paths, memo, table, workers or min(8, cpu_cores() + 2))
    memo.save()
    store.refresh()
    todo: dict[bytes, str] = {}
    for path, key in table.keys.items():
        if key not in store and key not in todo:
            todo[key] = path
    table.cached = sum(key in store for key in table.keys.values())
    if todo:
        engine = engine_factory()
        n_workers = workers or max(1, getattr(engine, "concurrency", 1))
        if getattr(engine, "concurrency", 1) == 1 and not workers:  # GPU or a plain function: decoders feed it
            n_workers = extraction_plan("cuda")[0]
        _extract(list(todo.items()), engine, store, table, spec=spec, batch_size=max(1, batch_size),
                 workers=n_workers, progress=progress)
    # A file whose content failed to decode is bad wherever it appears (duplicates included).
    bad_keys = {table.keys[p]: table.skipped[p] for p in table.skipped if p in table.keys}
    for path, key in list(table.keys.items()):
        if key in bad_keys:
            table.skipped.setdefault(path, bad_keys[key])  # the copy that was decoded says why
            del table.keys[path]
    table.seconds = time.perf_counter() - t0
    return table


def _decode_checked(key: bytes, path: str, size: int, resample: str) -> np.ndarray:
    data = read_image_bytes(path)
    if content_key(data) != key:  # edited since it was hashed: never cache under the old key
        raise ImageError("file changed while retrain was reading it")
    return decode_image(data, size, resample=resample)  # (size, size, 3) uint8


def _extract(todo: list[tuple[bytes, str]], engine, store: BottleneckStore, table: FeatureTable, *,
             spec: BackboneSpec, batch_size: int, workers: int, progress: bool) -> None:
    """Decode and run ``todo`` in batches on ``workers`` threads; at most one batch of pixels per thread."""
    size, resample = spec.preprocessing.input_size, spec.preprocessing.resample
    gate = threading.Semaphore(max(1, getattr(engine, "concurrency", 1)))
    lock = threading.Lock()  # guards the chunk iterator, the store, the table and the bar
    stop = threading.Event()
    chunks = iter([todo[i:i + batch_size] for i in range(0, len(todo), batch_size)])
    bar = progress_bar(len(todo), progress)

    def work() -> None:
        while not stop.is_set():
            with lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            pixels = np.empty((len(chunk), size, size, 3), dtype=np.uint8)  # (B, H, W, 3)
            keys: list[bytes] = []
            failed: dict[str, str] = {}
            for key, path in chunk:
                if stop.is_set():
                    return
                try:
                    pixels[len(keys)] = _decode_checked(key, path, size, resample)
                    keys.append(key)
                except ImageError as exc:
                    failed[path] = exc.reason
            feats = None
            if keys:
                with gate:
                    feats = engine(pixels[: len(keys)])  # (n, D)
            with lock:
                table.skipped.update(failed)
                if keys:
                    store.put_many(keys, feats)
                    table.computed += len(keys)
                bar.update(len(chunk))

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="retrain-extract") as pool:
            futures = [pool.submit(work) for _ in range(min(workers, len(todo)))]
            try:
                # Wake up often: a Ctrl-C delivered to a worker thread is only acted on when the main
                # thread runs Python code, and it should stop the run now, not when extraction ends.
                while wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION).not_done:
                    if any(f.done() and f.exception() for f in futures):
                        break
                for fut in futures:
                    fut.result()  # re-raises a worker's error
            except BaseException:  # an engine error or Ctrl-C: the other workers stop after their image
                stop.set()
                raise
    finally:
        store.flush()  # finished batches survive an interruption
        bar.close()


def progress_bar(total: int, enabled: bool, desc: str = "Computing bottlenecks"):
    """A bar with count, rate and ETA on a terminal; nothing when ``enabled`` is false or stderr is not a tty."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        disable=not enabled or not sys.stderr.isatty(),
        dynamic_ncols=True,
        smoothing=0.1,
    )
