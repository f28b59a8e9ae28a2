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

# Images per forward pass when none is asked for. On the CPU small batches are as fast as big ones
# (the activations of a batch of 8 stay near the caches) and each worker's ONNX Runtime arena stays
# ~250 MB smaller than at 32; a GPU wants bigger calls.
AUTO_BATCH = {"cpu": 8, "cuda": 64}


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
    cpu_seconds: float = 0.0  # this process's CPU time (all threads) while computing


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


def _memo_keys(paths: Sequence[str], memo: FileKeyMemo, table: FeatureTable) -> dict[str, bytes | None]:
    """Fill ``table.keys`` from the stat memo; return the paths it does not know, with their memo names."""
    unknown: dict[str, bytes | None] = {}
    for path in paths:
        name = key = None
        with contextlib.suppress(OSError, ValueError):
            name = os.fsencode(os.path.abspath(path))
            key = memo.lookup(name, FileKeyMemo.signature(os.stat(path)))
        if key is None:
            unknown[path] = name
        else:
            table.keys[path] = key
    return unknown


# -- extraction ------------------------------------------------------------------------------------
def compute_features(
    paths: Sequence[str],
    spec: BackboneSpec,
    store: BottleneckStore,
    *,
    engine_factory: Callable[[], Callable[[np.ndarray], np.ndarray]],
    batch_size: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> FeatureTable:
    """Make sure every readable file in ``paths`` has its features in ``store``.

    Each file the stat memo does not know is read exactly once, by an extraction worker:
    its bytes are hashed for the content key and, if that content is new, decoded from
    the same bytes. So the features are always stored under the key of the very bytes
    that were decoded, and a cold run costs one read per file.

    ``batch_size``: images per engine call (0: ``AUTO_BATCH`` for the engine's kind).
    ``workers``: extraction threads (default: one per core on the CPU). The engine's
    ``concurrency`` attribute (default 1) says how many of them may run it at once.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    table = FeatureTable()
    memo = FileKeyMemo(store.directory)
    store.refresh()
    unknown = _memo_keys(paths, memo, table)
    todo: list[tuple[str, bytes | None]] = []  # (path, key known from the memo, or None)
    claimed: set[bytes] = set()
    for path, key in table.keys.items():
        if key in store:
            table.cached += 1
        elif key not in claimed:
            claimed.add(key)
            todo.append((path, key))
    todo += [(path, None) for path in unknown]
    try:
        if todo:
            _Extraction(todo, engine_factory, spec, store, table, memo, unknown, claimed,
                        batch_size=batch_size, workers=workers).run(progress)
    finally:
        memo.save()
    # Callers' order; a memo key that turned out stale was replaced by the key of what was read.
    table.keys = {p: table.keys[p] for p in paths if p in table.keys}
    # A file whose content failed to decode is bad wherever it appears (duplicates included).
    bad_keys = {table.keys[p]: table.skipped[p] for p in table.skipped if p in table.keys}
    for path, key in list(table.keys.items()):
        if key in bad_keys:
            table.skipped.setdefault(path, bad_keys[key])  # the copy that was decoded says why
            del table.keys[path]
    table.seconds, table.cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    return table


class _Extraction:
    """Worker threads that read, hash, decode and batch files, and run the engine on each full batch.

    Each worker holds at most one batch of pixels. Shared state (the work list, the store, the
    table, the memo, the progress bar) is touched only under ``lock``.
    """

    def __init__(self, todo, engine_factory, spec: BackboneSpec, store: BottleneckStore, table: FeatureTable,
                 memo: FileKeyMemo, names: dict[str, bytes | None], claimed: set[bytes], *, batch_size: int,
                 workers: int | None):
        self.todo, self.store, self.table, self.memo, self.names = todo, store, table, memo, names
        self.claimed = claimed  # content keys being computed in this run (a worker has taken them on)
        self.size, self.resample = spec.preprocessing.input_size, spec.preprocessing.resample
        self.batch_size, self.workers = batch_size, workers
        self.engine_factory = engine_factory
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.items = iter(todo)

    def run(self, progress: bool) -> None:
        self.engine = self.engine_factory()
        concurrency = max(1, getattr(self.engine, "concurrency", 1))
        self.gate = threading.Semaphore(concurrency)
        # A GPU engine (or a plain function) runs one batch at a time: many decoding workers feed it.
        kind = "cuda" if concurrency == 1 else "cpu"
        n = self.workers or (extraction_plan("cuda")[0] if kind == "cuda" else concurrency)
        if self.batch_size < 1:
            self.batch_size = AUTO_BATCH[kind]
        self.bar = progress_bar(len(self.todo), progress)
        try:
            with ThreadPoolExecutor(n, thread_name_prefix="retrain-extract") as pool:
                futures = [pool.submit(self.work) for _ in range(min(n, len(self.todo)))]
                try:
                    # Wake up often: a Ctrl-C delivered to a worker thread is only acted on when the main
                    # thread runs Python code, and it should stop the run now, not when extraction ends.
                    while wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION).not_done:
                        if any(f.done() and f.exception() for f in futures):
                            break
                    for fut in futures:
                        fut.result()  # re-raises a worker's error
                except BaseException:  # an engine error or Ctrl-C: the other workers stop after their image
                    self.stop.set()
                    raise
        finally:
            self.store.flush()  # finished batches survive an interruption
            self.bar.close()

    def work(self) -> None:
        pixels = np.empty((self.batch_size, self.size, self.size, 3), dtype=np.uint8)  # (B, H, W, 3)
        keys: list[bytes] = []
        while not self.stop.is_set():
            with self.lock:
                item = next(self.items, None)
            if item is None:
                break
            path, key = item
            try:
                key = self._claim(path, key, pixels, len(keys))
            except ImageError as exc:
                with self.lock:
                    self.table.skipped[path] = exc.reason
                    self.bar.update(1)
                continue
            if key is None:  # cached, or another file with the same content has it
                continue
            keys.append(key)
            if len(keys) == self.batch_size:
                self._run_batch(pixels, keys)
                keys = []
        if keys and not self.stop.is_set():
            self._run_batch(pixels, keys)

    def _claim(self, path: str, memo_key: bytes | None, pixels: np.ndarray, slot: int) -> bytes | None:
        """Read ``path`` once; decode it into ``pixels[slot]`` and return its key if its content is new."""
        try:
            sig = FileKeyMemo.signature(os.stat(path))  # before reading: a later edit changes the signature
        except OSError:
            sig = None  # read_image_bytes says why
        data = read_image_bytes(path)
        key = content_key(data)
        with self.lock:
            self.table.keys[path] = key
            name = self.names.get(path)
            if name is None and memo_key is not None and key != memo_key:  # the memo was stale: mend it
                with contextlib.suppress(ValueError):
                    name = os.fsencode(os.path.abspath(path))
            if name is not None and sig is not None:
                self.memo.remember(name, sig, key)
            if key != memo_key and (key in self.store or key in self.claimed):
                if key in self.store:
                    self.table.cached += 1
                self.bar.update(1)
                return None
            self.claimed.add(key)
        pixels[slot] = decode_image(data, self.size, resample=self.resample)  # (size, size, 3) uint8
        return key

    def _run_batch(self, pixels: np.ndarray, keys: list[bytes]) -> None:
        with self.gate:
            feats = self.engine(pixels[: len(keys)])  # (n, D)
        with self.lock:
            self.store.put_many(keys, feats)
            self.table.computed += len(keys)
            self.bar.update(len(keys))


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
