"""Stage 2: bottleneck features for every image, computed once and cached.

Every file gets a content key (SHA-1 of its bytes). Files seen before with the same
stat signature reuse their key from a small memo (:mod:`retrain.keymemo`), so a warm
run reads no image at all. Only content missing from the cache is decoded and pushed
through the backbone.

On the CPU the work is split by image, not inside the network: one worker thread per
core decodes a batch (Pillow releases the GIL) and then runs it through a shared ONNX
Runtime session with a single intra-op thread. Each core is always busy with either
decoding or arithmetic, no thread spins waiting for another, and decoding overlaps
with the other workers' inference. A CUDA GPU, when present, runs the network through
PyTorch, fed by many decoding threads (:mod:`retrain.engines`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from retrain.backbones import BackboneSpec, get_backbone
from retrain.cache import BottleneckStore, content_key
from retrain.data import Dataset, discover
from retrain.engines import AUTO_BATCH, engine_kind, extraction_plan, make_engine
from retrain.feature_cache import open_store
from retrain.images import ImageError, decode_image, read_image_bytes
from retrain.keymemo import FileKeyMemo

log = logging.getLogger("retrain")


@dataclass
class FeatureTable:
    """Features for a list of files, aligned with the list; unreadable files are reported, not raised."""

    keys: dict[str, bytes] = field(default_factory=dict)  # path -> content key
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads) while computing
    store: BottleneckStore | None = None  # where the features are (set by extract_features)

    def matrix(self, paths: Sequence[str]) -> np.ndarray:
        """The features of ``paths`` (readable files of this table), one row each: (N, D) float32."""
        if self.store is None:
            raise ValueError("this FeatureTable has no store; make it with extract_features()")
        if not len(paths):
            return np.zeros((0, self.store.feature_dim), np.float32)
        return self.store.get_many([self.keys[p] for p in paths])


def extract_features(
    images: Dataset | Sequence[str] | str | os.PathLike,
    *,
    architecture: str | BackboneSpec = "efficientnet_lite0",
    bottleneck_dir: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 0,
    num_workers: int = 0,
    progress: bool = False,
) -> FeatureTable:
    """The backbone's features of ``images`` (a :class:`Dataset`, a folder of class folders, or file paths),
    through the cache.

    Unreadable files are listed in ``table.skipped`` with the reason; ``table.matrix(paths)`` gives
    the (N, D) features of readable ones. Arguments mean what the ``retrain`` flags of the same names do.
    """
    spec = architecture if isinstance(architecture, BackboneSpec) else get_backbone(architecture)
    if isinstance(images, (str, os.PathLike)):  # a folder of class folders, not a list of paths
        images = discover(images)
    paths = (
        [r.path for r in images.records] if isinstance(images, Dataset) else [os.fspath(p) for p in images]
    )
    store = open_store(spec, bottleneck_dir, engine=engine_kind(device))
    table = compute_features(
        paths,
        spec,
        store,
        engine_factory=lambda: make_engine(spec, device=device, model_dir=model_dir or None),
        batch_size=batch_size,
        workers=num_workers or None,
        progress=progress,
    )
    table.store = store
    store.compact()
    return table


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

    ``batch_size``: images per engine call (0: the engine's ``batch_size``).
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
            _Extraction(
                todo,
                engine_factory,
                spec,
                store,
                table,
                memo,
                unknown,
                claimed,
                batch_size=batch_size,
                workers=workers,
            ).run(progress)
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

    def __init__(
        self,
        todo,
        engine_factory,
        spec: BackboneSpec,
        store: BottleneckStore,
        table: FeatureTable,
        memo: FileKeyMemo,
        names: dict[str, bytes | None],
        claimed: set[bytes],
        *,
        batch_size: int,
        workers: int | None,
    ):
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
        # The engine says what it is (a plain function is a one-call-at-a-time CPU engine). A GPU runs one
        # batch at a time, fed by many decoding workers; a CPU engine gets one worker per concurrent call.
        concurrency = max(1, getattr(self.engine, "concurrency", 1))
        device = getattr(self.engine, "device", "cpu")
        self.gate = threading.Semaphore(concurrency)
        n = self.workers or (extraction_plan("cuda")[0] if device == "cuda" else concurrency)
        if self.batch_size < 1:
            self.batch_size = getattr(self.engine, "batch_size", AUTO_BATCH["cpu"])
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
