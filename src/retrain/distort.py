"""Random distortions of training images, at cached speed.

retrain.py's four flags, with its semantics (``add_input_distortions``), on training
images only:

* ``random_crop`` C: margin ``m = 1 + C/100``;
* ``random_scale`` S: zoom ``z ~ U[1, 1 + S/100]``;
* resize the image to ``m * z * (H, W)`` and cut a random ``(H, W)`` window out of it;
* ``flip_left_right``: mirror with probability 1/2;
* ``random_brightness`` B: multiply the pixels by ``U[1 - B/100, 1 + B/100]``.

retrain.py switched its bottleneck cache off for this and pushed every image of every
step through the network again (4,000 steps x 100 images: "many hours"). Here each
training image gets ``copies`` distorted *variants*; their features are computed once
and cached under a key made of the image's content key, the distortion settings and the
copy number, so the head trains on cached vectors at full speed and a later run with
the same settings reuses them. The random draws of a variant are a function of that
key alone (not of ``--seed``): the cache entry is then exactly reproducible, and any
run reuses it. ``--seed`` still decides which variants each training step draws.

The geometric part is one batched ``grid_sample``: "resize by ``m*z``, crop at offset
``o``, mirror" is the affine map ``output -> source`` with scale ``1/(m*z)``, so each
image is decoded once, at the largest size any draw needs, and every variant is sampled
from that. Pixels stay uint8 as a camera would give them, so a brightness factor above
1 saturates at 255 (retrain.py fed unclipped floats to the network).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrain.backbones import BackboneSpec
from retrain.cache import BottleneckStore
from retrain.errors import RetrainError
from retrain.feature_cache import CPU_ENGINE, open_store
from retrain.images import ImageError, decode_image, read_image_bytes
from retrain.prefetch import decode_ahead

if TYPE_CHECKING:
    from retrain.config import TrainConfig
    from retrain.splits import Split

log = logging.getLogger("retrain")

# Bump when the way a variant's pixels are made changes: it is part of every variant key.
DISTORT_VERSION = 1
MAX_COPIES = 10
# Automatic --distorted_copies: about this many distorted images in total, between 2 and MAX_COPIES
# per image (extraction costs one forward pass per variant, once; see docs/finetune.md).
AUTO_BUDGET = 10_000


@dataclass(frozen=True)
class Distortions:
    """The four distortion settings; percentages as retrain.py's flags give them."""

    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0

    def __post_init__(self) -> None:
        for name in ("random_crop", "random_scale", "random_brightness"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise RetrainError(f"--{name} must be a percentage >= 0, got {value!r}")
        if self.random_brightness > 100:
            raise RetrainError(
                f"--random_brightness must be at most 100 (the factor is U[1 - b/100, 1 + b/100] and cannot "
                f"go below 0), got {self.random_brightness!r}"
            )

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Distortions:
        return cls(
            flip_left_right=bool(cfg.flip_left_right),
            random_crop=float(cfg.random_crop),
            random_scale=float(cfg.random_scale),
            random_brightness=float(cfg.random_brightness),
        )

    @property
    def active(self) -> bool:
        return self.flip_left_right or bool(self.random_crop or self.random_scale or self.random_brightness)

    @property
    def geometric(self) -> bool:
        return bool(self.random_crop or self.random_scale)

    def source_size(self, size: int) -> int:
        """Side of the decoded image every variant is sampled from: the largest ``m * z * size``."""
        return math.ceil(size * (1 + self.random_crop / 100) * (1 + self.random_scale / 100) - 1e-9)

    def identity(self) -> str:
        """What decides a variant's pixels besides the image and the copy number (part of its cache key)."""
        from importlib.metadata import version

        return json.dumps(
            {
                "v": DISTORT_VERSION,
                "flip": self.flip_left_right,
                "crop": self.random_crop,
                "scale": self.random_scale,
                "brightness": self.random_brightness,
                # grid_sample's rounding could move a pixel by one level across releases
                "torch": version("torch").split("+")[0],
            },
            sort_keys=True,
        )

    def describe(self) -> str:
        parts = ["flip" if self.flip_left_right else ""]
        for name, label in (
            ("random_crop", "crop"),
            ("random_scale", "scale"),
            ("random_brightness", "brightness"),
        ):
            if getattr(self, name):
                parts.append(f"{label} {getattr(self, name):g}%")
        return ", ".join(p for p in parts if p)


@dataclass
class Draws:
    """Random parameters of a batch of distortions, one entry per image (all arrays (N,))."""

    zoom: np.ndarray  # z in [1, 1 + S/100]
    offset_x: np.ndarray  # where the crop window sits in the free margin: 0 = left, 1 = right
    offset_y: np.ndarray  # 0 = top, 1 = bottom
    flip: np.ndarray  # bool
    brightness: np.ndarray  # factor in [1 - B/100, 1 + B/100]

    def __len__(self) -> int:
        return len(self.zoom)

    def take(self, idx) -> Draws:
        return Draws(*(getattr(self, f)[idx] for f in _DRAW_FIELDS))

    @classmethod
    def concat(cls, draws: Sequence[Draws]) -> Draws:
        return cls(*(np.concatenate([getattr(d, f) for d in draws]) for f in _DRAW_FIELDS))


_DRAW_FIELDS = ("zoom", "offset_x", "offset_y", "flip", "brightness")


def draw(d: Distortions, rng: np.random.Generator, n: int, *, flip: np.ndarray | None = None) -> Draws:
    """``n`` independent draws with retrain.py's distributions (``flip`` may be given instead of drawn)."""
    b = d.random_brightness / 100
    return Draws(
        zoom=rng.uniform(1.0, 1.0 + d.random_scale / 100, n),
        offset_x=rng.random(n),
        offset_y=rng.random(n),
        flip=(rng.random(n) < 0.5 if flip is None else np.asarray(flip, bool)) & d.flip_left_right,
        brightness=rng.uniform(1.0 - b, 1.0 + b, n),
    )


def variant_draws(d: Distortions, key: bytes, copies: Sequence[int], identity: str | None = None) -> Draws:
    """The draws of copies ``copies`` of the image with content key ``key``: a pure function of its inputs.

    Flips alternate between consecutive copies (from a random start per image), so any two
    copies hold one mirrored and one plain view instead of both being mirrored a quarter of
    the time; each copy on its own is still mirrored with probability 1/2.
    """
    identity = identity if identity is not None else d.identity()
    start = hashlib.sha256(b"flip" + key + identity.encode()).digest()[0] & 1
    parts = []
    for c in copies:
        seed = hashlib.sha256(key + identity.encode() + int(c).to_bytes(4, "little")).digest()
        rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
        parts.append(draw(d, rng, 1, flip=np.array([(start + c) % 2 == 1])))
    return Draws.concat(parts)


def variant_key(key: bytes, identity: str, copy: int) -> bytes:
    """Cache key of one distorted variant: content key + distortion settings + copy number."""
    return hashlib.sha1(
        b"retrain-distorted\0" + key + identity.encode() + int(copy).to_bytes(4, "little")
    ).digest()


def apply(pixels: np.ndarray, d: Distortions, draws: Draws, size: int) -> np.ndarray:
    """Distort a batch: (N, S, S, 3) uint8 source images -> (N, size, size, 3) uint8.

    ``S`` should be ``d.source_size(size)`` (any S works; the geometry is in relative units).
    """
    import torch
    import torch.nn.functional as F

    n = len(pixels)
    if n != len(draws):
        raise ValueError(f"{n} images but {len(draws)} draws")
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()  # (N, 3, S, S)
    margin = 1.0 + d.random_crop / 100
    # The (size x size) window is this fraction of the image after resizing to margin * zoom * size.
    visible = 1.0 / (margin * draws.zoom)  # (N,)
    # In grid_sample's [-1, 1] coordinates the window's centre may move by +-(1 - visible).
    tx = (1.0 - visible) * (2.0 * draws.offset_x - 1.0)
    ty = (1.0 - visible) * (2.0 * draws.offset_y - 1.0)
    theta = np.zeros((n, 2, 3), np.float32)  # maps output coordinates to source coordinates
    theta[:, 0, 0] = np.where(draws.flip, -visible, visible)  # mirroring after the crop = negate x
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = visible
    theta[:, 1, 2] = ty
    if x.shape[-1] == size and not np.any(visible < 1):  # plain flip/brightness: no resampling at all
        out = torch.where(torch.from_numpy(draws.flip)[:, None, None, None], x.flip(-1), x)
    else:
        grid = F.affine_grid(torch.from_numpy(theta), [n, 3, size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if d.random_brightness:
        out = out * torch.from_numpy(draws.brightness.astype(np.float32))[:, None, None, None]
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def choose_copies(requested: int, n_train: int, d: Distortions) -> int:
    """``--distorted_copies``: the number asked for, or (0) an automatic choice."""
    if requested < 0:
        raise RetrainError(f"--distorted_copies must be >= 0 (0 = automatic), got {requested}")
    if requested:
        return requested
    if not (d.geometric or d.random_brightness):
        return 2  # a flip has two outcomes and alternating copies cover both exactly
    return int(np.clip(math.ceil(AUTO_BUDGET / max(n_train, 1)), 2, MAX_COPIES))


def iter_variant_pixels(
    paths: Sequence[str],
    keys: Sequence[bytes],
    todo: Sequence[Sequence[int]],
    d: Distortions,
    size: int,
    *,
    resample: str = "bilinear",
    batch_size: int = 32,
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode each image once and yield its distorted variants in batches.

    ``todo[i]`` lists the copy numbers wanted for image ``paths[i]`` (content key ``keys[i]``).
    Yields ``(image_index (B,), copy (B,), pixels (B, size, size, 3) uint8)``.
    """
    identity = d.identity()
    source = d.source_size(size)
    wanted = [i for i, copies in enumerate(todo) if len(copies)]

    def decode(i: int) -> np.ndarray:
        try:
            return decode_image(read_image_bytes(paths[i]), source, resample=resample)  # (S, S, 3)
        except ImageError as exc:
            raise RetrainError(
                f"cannot distort {paths[i]!r}: {exc.reason} (it was readable a moment ago)"
            ) from None

    rows: list[int] = []
    copies: list[int] = []
    images: list[np.ndarray] = []
    draws: list[Draws] = []

    def flush() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = apply(np.stack(images), d, Draws.concat(draws), size)
        result = (np.array(rows), np.array(copies), out)
        rows.clear(), copies.clear(), images.clear(), draws.clear()
        return result

    # The next chunk is decoded in threads while this one is distorted and run through the network.
    for _, chunk, decoded in decode_ahead(wanted, decode, batch_size, workers):
        for i, px in zip(chunk, decoded):  # each image decoded once, for all of its copies
            wanted_copies = list(todo[i])
            dr = variant_draws(d, keys[i], wanted_copies, identity)
            for j, c in enumerate(wanted_copies):
                rows.append(i)
                copies.append(c)
                images.append(px)
                draws.append(dr.take([j]))
                if len(rows) == batch_size:
                    yield flush()
    if rows:
        yield flush()


def variant_store(
    spec: BackboneSpec, bottleneck_dir: str | os.PathLike | None = None, *, engine: str = CPU_ENGINE
) -> BottleneckStore:
    """The cache of distorted-variant features: beside the plain bottlenecks, never mixed into them."""
    # A sibling folder, so a plain run does not load (copies x) more vectors it never uses.
    return open_store(spec, bottleneck_dir, engine=engine, suffix="-distorted")


def distorted_training_features(
    train: Split, spec: BackboneSpec, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``copies`` distorted variants of every training image: (N * copies, D), (N * copies,).

    ``config`` gives the distortion flags, ``--distorted_copies`` and where and how to compute
    (``bottleneck_dir``, ``device``, ``model_dir``, ``batch_size``, ``num_workers``, ``quiet``).
    Variants already in the cache are reused; the rest are computed in batches (each image is
    decoded once). Validation and test images are never distorted.
    """
    from retrain.engines import engine_kind, make_engine
    from retrain.features import progress_bar

    cfg = config
    d = Distortions.from_config(cfg)
    n = len(train.y)
    copies = choose_copies(cfg.distorted_copies, n, d)
    t0 = time.perf_counter()
    identity = d.identity()
    keys = train.keys  # content keys the pipeline already has: a warm run reads no image
    store = variant_store(spec, cfg.bottleneck_dir, engine=engine_kind(cfg.device))
    store.refresh()
    vkeys = [[variant_key(k, identity, c) for c in range(copies)] for k in keys]
    todo = [[c for c in range(copies) if vk[c] not in store] for vk in vkeys]
    missing = sum(len(t) for t in todo)
    if missing:
        # One caller thread (the decoding runs in the pool): let ONNX Runtime use every core per call.
        engine = make_engine(spec, device=cfg.device, model_dir=cfg.model_dir or None, workers=1)
        bar = progress_bar(missing, not cfg.quiet, "Distorted variants")
        for rows, cs, pixels in iter_variant_pixels(
            train.paths,
            keys,
            todo,
            d,
            spec.preprocessing.input_size,
            resample=spec.preprocessing.resample,
            batch_size=cfg.pixel_batch_size,
            workers=cfg.num_workers or None,
        ):
            store.put_many([vkeys[i][c] for i, c in zip(rows, cs)], engine(pixels))  # (B, D)
            bar.update(len(rows))
        bar.close()
        store.flush()
        store.compact()
    X = store.get_many([k for vk in vkeys for k in vk])  # (N * copies, D), image-major
    y = np.repeat(np.asarray(train.y), copies)
    log.info(
        "Distortions (%s): %d variants of each of %d training images; %d computed, %d reused from the cache "
        "in %s (%.1f s)",
        d.describe(),
        copies,
        n,
        missing,
        n * copies - missing,
        store.directory,
        time.perf_counter() - t0,
    )
    return X, y
