"""Stage 2: bottleneck features for every image, computed once and cached.

Files are read and hashed in a thread pool; only images whose content is not in the
cache are decoded (also in threads, overlapping with inference) and pushed through
the backbone in batches. ONNX Runtime runs the network on the CPU; a CUDA GPU, when
present, runs it through PyTorch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from retrain.backbones import BackboneSpec
from retrain.cache import BottleneckStore, content_key, namespace_for
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
    import torch

    return torch.cuda.is_available()


def cache_namespace(spec: BackboneSpec) -> str:
    return namespace_for(
        backbone=spec.name,
        weights=spec.weights_id,
        preprocessing=spec.preprocessing.to_dict(),
        decoder=DECODE_VERSION,
    )


class OnnxEngine:
    """Runs a pixels->features (or pixels->probabilities) ONNX graph on the CPU."""

    def __init__(self, model_path: str | os.PathLike | bytes, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        src = model_path if isinstance(model_path, bytes) else os.fspath(model_path)
        self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


class TorchEngine:
    """Runs the backbone through PyTorch on a CUDA GPU (or CPU, for comparison)."""

    def __init__(self, spec: BackboneSpec, device: str = "cuda", net=None):
        import torch

        from retrain.torch_modules import PixelsToFeatures

        self.torch = torch
        self.device = torch.device(device)
        module = PixelsToFeatures(net if net is not None else spec.build(), spec.preprocessing)
        self.module = module.eval().to(self.device)
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            return self.module(x).float().cpu().numpy()


def make_engine(spec: BackboneSpec, *, device: str = "auto", model_dir=None, threads: int | None = None):
    if resolve_device(device) == "cuda":
        return TorchEngine(spec, "cuda")
    from retrain.export import backbone_onnx_path

    return OnnxEngine(backbone_onnx_path(spec, model_dir), threads=threads)


@dataclass
class FeatureTable:
    """Features for a list of files, aligned with the list; unreadable files are reported, not raised."""

    keys: dict[str, bytes] = field(default_factory=dict)  # path -> content key
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0


def _read_and_key(path: str) -> tuple[str, bytes | None, str | None]:
    try:
        return path, content_key(read_image_bytes(path)), None
    except ImageError as exc:
        return path, None, exc.reason


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, window: int) -> Iterator:
    """Like ``pool.map`` but with at most ``window`` items in flight, so memory stays bounded."""
    pending = []
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    for item in it:
        yield pending.pop(0).result()
        pending.append(pool.submit(fn, item))
    for fut in pending:
        yield fut.result()


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
    """Make sure every readable file in ``paths`` has its features in ``store``."""
    t0 = time.perf_counter()
    table = FeatureTable()
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    size, resample = spec.preprocessing.input_size, spec.preprocessing.resample
    with ThreadPoolExecutor(workers) as pool:
        for path, key, reason in pool.map(_read_and_key, paths):
            if key is None:
                table.skipped[path] = reason
            else:
                table.keys[path] = key
        store.refresh()
        todo: dict[bytes, str] = {}
        for path, key in table.keys.items():
            if key not in store and key not in todo:
                todo[key] = path
        table.cached = sum(key in store for key in table.keys.values())
        if todo:
            engine = engine_factory()
            bar = _progress(len(todo), progress)

            def decode(item: tuple[bytes, str]):
                key, path = item
                try:
                    data = read_image_bytes(path)
                    if content_key(data) != key:  # edited since it was hashed: never cache under the old key
                        raise ImageError("file changed while retrain was reading it")
                    return key, path, decode_image(data, size, resample=resample), None
                except ImageError as exc:
                    return key, path, None, exc.reason

            batch_keys: list[bytes] = []
            batch_pixels: list[np.ndarray] = []

            def run_batch() -> None:
                feats = engine(np.stack(batch_pixels))  # (B, D)
                store.put_many(batch_keys, feats)
                table.computed += len(batch_keys)
                bar.update(len(batch_keys))
                batch_keys.clear()
                batch_pixels.clear()

            for key, path, pixels, reason in _bounded_map(pool, decode, list(todo.items()), 4 * batch_size):
                if pixels is None:
                    table.skipped[path] = reason
                    continue
                batch_keys.append(key)
                batch_pixels.append(pixels)
                if len(batch_keys) == batch_size:
                    run_batch()
            if batch_keys:
                run_batch()
            store.flush()
            bar.close()
    # A file whose content failed to decode is bad wherever it appears (duplicates included).
    bad_keys = {table.keys[p]: table.skipped[p] for p in table.skipped if p in table.keys}
    for path, key in list(table.keys.items()):
        if key in bad_keys:
            table.skipped.setdefault(path, bad_keys[key])  # the copy that was decoded says why
            del table.keys[path]
    table.seconds = time.perf_counter() - t0
    return table


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc="Computing bottlenecks",
        unit="img",
        disable=not enabled or not sys.stderr.isatty(),
        dynamic_ncols=True,
        smoothing=0.1,
    )
