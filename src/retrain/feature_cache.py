"""Where cached features live: the cache root and one namespace per feature definition.

Layout: ``<root>/<namespace>/`` holds one :class:`~retrain.cache.BottleneckStore`. The root is
``--bottleneck_dir`` or ``~/.cache/retrain/bottlenecks``. The namespace is derived from
everything that decides a feature's value: backbone, weights, preprocessing, decoder and the
engine that ran the network. ONNX Runtime and PyTorch agree to about 1e-5, not bit for bit
(measured on the CPU: docs/benchmarks.md, "GPU"), so they keep their features apart: the CPU engine (``onnxruntime-cpu``)
keeps the namespace of the releases that had no other engine, every other engine adds itself to
the key. A run on a GPU therefore computes its own features once instead of reusing the CPU's.
"""

from __future__ import annotations

import os
from pathlib import Path

from retrain.backbones import BackboneSpec
from retrain.cache import BottleneckStore, namespace_for
from retrain.config import default_cache_dir
from retrain.data import printable
from retrain.errors import RetrainError
from retrain.images import DECODE_VERSION

CPU_ENGINE = "onnxruntime-cpu"  # the engine whose features the namespace always described


def cache_root(bottleneck_dir: str | os.PathLike | None = None) -> Path:
    """``--bottleneck_dir``, or ``~/.cache/retrain/bottlenecks`` when it is empty."""
    return Path(bottleneck_dir) if bottleneck_dir else default_cache_dir() / "bottlenecks"


def cache_namespace(spec: BackboneSpec, engine: str = CPU_ENGINE) -> str:
    """The folder name for ``spec``'s features as computed by ``engine`` (an engine's ``kind``)."""
    identity: dict[str, object] = dict(
        backbone=spec.name,
        weights=spec.weights_id,
        preprocessing=spec.preprocessing.to_dict(),
        decoder=DECODE_VERSION,
    )
    if engine != CPU_ENGINE:
        identity["engine"] = engine
    return namespace_for(**identity)


def open_store(
    spec: BackboneSpec,
    bottleneck_dir: str | os.PathLike | None = None,
    *,
    engine: str = CPU_ENGINE,
    suffix: str = "",
) -> BottleneckStore:
    """The store of ``spec``'s features by ``engine``; ``suffix`` names a sibling (e.g. ``-distorted``)."""
    root = cache_root(bottleneck_dir)
    try:
        return BottleneckStore(root / f"{cache_namespace(spec, engine)}{suffix}", spec.feature_dim)
    except OSError as exc:
        raise RetrainError(
            f"cannot use --bottleneck_dir {printable(str(root))!r}: {exc.strerror or exc}"
        ) from None
