"""Stage 3b (``--fine_tune``): train the top of the backbone together with the new layer.

After the new layer has been trained on frozen features, the top ``--fine_tune_blocks``
blocks of the backbone are unfrozen and trained with it, as Keras' transfer-learning
guide and fastai's ``fine_tune`` do:

* batch normalisation stays in inference mode: its running statistics never change
  (a few thousand images would only make them worse than ImageNet's), only the
  scale/shift parameters of the unfrozen blocks train;
* the backbone learns ``--fine_tune_learning_rate`` (Adam), the new layer ten times that;
* every epoch is scored on the whole validation split (accuracy, then cross entropy);
  training stops after ``--fine_tune_patience`` epochs without improvement and the best
  epoch's weights are kept. Epoch 0 is the model before fine-tuning, so fine-tuning never
  ends with a worse validation score than it started with;
* the training images are drawn by the same ``--class_balance`` policy as for the new layer;
* with distortions on, each epoch draws among the same cached distorted variants.

CPU-friendly: the frozen lower part runs once per image, through ONNX Runtime (several times
faster than PyTorch on a CPU), and its output, the input of the first unfrozen block, is
kept in memory; each epoch then only runs the top blocks. On a CUDA GPU everything runs
in PyTorch on the GPU.

With ``--resume``, a checkpoint written atomically after every epoch next to the head's
checkpoint (``<checkpoint>-finetune.pt``) lets an interrupted run continue at the epoch it
had reached, with the same random state, so it ends where an uninterrupted run would.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrain.backbones import BackboneSpec, get_backbone
from retrain.cache import atomic_write_bytes
from retrain.config import TrainConfig
from retrain.errors import RetrainError
from retrain.head import softmax
from retrain.images import ImageError, decode_image, read_image_bytes
from retrain.prefetch import decode_ahead
from retrain.sampling import CLASS_BALANCE, ClassBalancedSampler
from retrain.splits import Splits
from retrain.torch_modules import NormalizePixels

log = logging.getLogger("retrain")

CHECKPOINT_VERSION = 3  # 2: the pixel normalisation's buffers moved into their own module; 3: the recipe
HEAD_LR_MULTIPLIER = 10  # the new layer learns this many times faster than the backbone
MAX_BATCH = 64  # images per fine-tuning step: cfg.train_batch_size, at most this
# Cached activations go to float16 above this share of the machine's memory, and are refused above
# FP16_MEMORY_SHARE (the message says how to make them fit).
FP32_MEMORY_SHARE = 0.25
FP16_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Recipe:
    """How the fine-tuning epochs train. ``Recipe()`` is the original ``--fine_tune``; ``BEST_RECIPE`` is
    ``--quality best``'s (chosen by measurement, docs/finetune.md)."""

    optimizer: str = "adam"  # "adam": --weight_decay as L2 on the new layer only; "adamw": decoupled, all
    head_lr_multiplier: float = HEAD_LR_MULTIPLIER  # the new layer's learning rate / the backbone's
    schedule: str = "constant"  # "cosine": linear warm-up, then cosine decay to 0 at the last epoch
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    weight_decay: float = 0.0  # with "adamw": decoupled weight decay of backbone and new layer
    # "best": the epoch with the best validation score (epoch 0 = before fine-tuning); "last": the last epoch,
    # chosen by no score, so that its validation accuracy is an unbiased estimate (best mode compares it
    # with the frozen model's, retrain.quality)
    keep: str = "best"

    def factor(self, step: int, total: int, warmup: int) -> float:
        """Learning-rate multiplier before optimizer step ``step`` (0-based) of ``total``."""
        if self.schedule != "cosine":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


BEST_RECIPE = Recipe(
    optimizer="adamw",
    head_lr_multiplier=1.0,
    schedule="cosine",
    warmup_epochs=1.0,
    label_smoothing=0.1,
    weight_decay=0.01,
    keep="last",
)
# --quality best: these settings, unless a flag changed them from its default. Best mode runs its own
# fine-tuning stage (retrain.quality), so --fine_tune itself stays off: the default run's frozen model
# (new layer on training + validation) is what fine-tuning has to beat.
BEST_SETTINGS = {
    "fine_tune_blocks": "6",
    "fine_tune_epochs": 8,
    "fine_tune_learning_rate": 3e-4,
    "fine_tune_patience": 100,
}


def apply_quality(cfg: TrainConfig) -> TrainConfig:
    """``--quality best`` -> the fine-tuning settings of BEST_SETTINGS, for each flag left at its default."""
    if getattr(cfg, "quality", "default") != "best":
        return cfg
    defaults = TrainConfig()
    changes = {k: v for k, v in BEST_SETTINGS.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, fine_tune=False, **changes)


def recipe_for(cfg: TrainConfig) -> Recipe:
    return BEST_RECIPE if getattr(cfg, "quality", "default") == "best" else Recipe()


@dataclass
class FineTunedHead:
    """The new layer after fine-tuning; features must come from the fine-tuned backbone."""

    coef_: np.ndarray  # (D, C)
    intercept_: np.ndarray  # (C,)
    best_step_: int | None = None  # of the head stage before fine-tuning
    best_epoch_: int = 0
    epochs_: int = 0

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(X, np.float32) @ self.coef_ + self.intercept_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


@dataclass
class EpochReport:
    epoch: int  # 0 = before fine-tuning
    train_loss: float | None
    train_accuracy: float | None
    validation_accuracy: float | None
    validation_loss: float | None
    seconds: float = 0.0


@dataclass
class FineTuneResult:
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    history: list[EpochReport] = field(default_factory=list)
    resumed_from_epoch: int = 0


def first_unfrozen_block(blocks: str | int, n_blocks: int) -> int:
    """``--fine_tune_blocks`` (a count from the top, or ``all``) -> index of the first block that trains."""
    text = str(blocks).strip().lower()
    if text == "all":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= n_blocks:
        raise RetrainError(
            f"--fine_tune_blocks must be a number of blocks from 1 to {n_blocks} (this backbone has {n_blocks}) "
            f"or 'all', got {blocks!r}"
        )
    return n_blocks - n


@dataclass
class FineTuned:
    """What :func:`fine_tune` returns. When no epoch beat the start on validation, ``backbone_onnx`` is
    None and ``head`` and ``splits`` are the ones passed in: keep the pretrained backbone."""

    head: object  # FineTunedHead, or the head passed in
    backbone_onnx: bytes | None  # the fine-tuned pixels -> features graph, for export_model()
    splits: Splits  # features recomputed with the fine-tuned backbone
    result: FineTuneResult
    first_unfrozen_block: int
    n_blocks: int

    def report(self) -> dict:
        """The contents of ``fine_tune.json``."""
        r = self.result
        return {
            "first_unfrozen_block": self.first_unfrozen_block,
            "unfrozen_blocks": self.n_blocks - self.first_unfrozen_block,
            "epochs_run": r.epochs_run,
            "best_epoch": r.best_epoch,
            "stopped_early": r.stopped_early,
            "resumed_after_epoch": r.resumed_from_epoch,
            "history": [dataclasses.asdict(h) for h in r.history],
        }


def fine_tune(
    head,
    splits: Splits,
    *,
    architecture: str | BackboneSpec = "efficientnet_lite0",
    config: TrainConfig | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    summaries_dir: str | os.PathLike | None = None,
    recipe: Recipe | None = None,
) -> FineTuned:
    """Fine-tune the top of the backbone together with ``head`` (fitted on ``splits.train``'s features).

    ``config`` gives the ``fine_tune_*`` settings, ``class_balance``, ``train_batch_size``,
    ``weight_decay``, the distortion flags, ``device`` and ``resume``. ``checkpoint``: where the
    state is saved after every epoch (and read back with ``config.resume``); ``summaries_dir``:
    TensorBoard curves. Both optional. ``recipe``: how the epochs train (default: ``recipe_for(config)``). The splits' features are recomputed with the fine-tuned
    network, so a test accuracy measured on the returned splits is the fine-tuned model's.
    """
    from retrain.devices import resolve_device
    from retrain.distort import Distortions, choose_copies

    cfg = config or TrainConfig()
    spec = architecture if isinstance(architecture, BackboneSpec) else get_backbone(architecture)
    t0 = time.perf_counter()
    _check_settings(cfg)
    device = torch.device(resolve_device(cfg.device))
    net = spec.build().eval()
    blocks = cfg.fine_tune_blocks
    if cfg.quality == "best" and str(blocks).isdigit() and int(blocks) > len(net.blocks):
        blocks = "all"  # a backbone with fewer blocks than the recipe's: all of them
    k = first_unfrozen_block(blocks, len(net.blocks))
    top = _TopOfNet(list(net.blocks)[k:], spec.preprocessing if k == 0 else None)
    _check_contract(spec.name, net, spec.preprocessing.input_size)

    train, val = splits.train, splits.validation
    distortions = Distortions.from_config(cfg)
    copies = choose_copies(cfg.distorted_copies, len(train.y), distortions) if distortions.active else 0
    inputs = _TopInputs.compute(cfg, spec, net, k, device, splits, distortions, copies)
    log.info(
        "Fine-tuning the top %d of %d backbone blocks (%s) on %s; the frozen part ran once per image (%.1f s)",
        len(net.blocks) - k,
        len(net.blocks),
        "all" if k == 0 else f"from block {k}",
        device.type,
        time.perf_counter() - t0,
    )

    tuner = _Tuner(
        cfg,
        spec,
        seed,
        splits.labels,
        top,
        head,
        inputs,
        device,
        copies,
        train.y,
        val.y,
        checkpoint=checkpoint,
        summaries_dir=summaries_dir,
        recipe=recipe or recipe_for(cfg),
    )
    tuner.log_estimate(time.perf_counter() - t0)
    result = tuner.fit()
    n_blocks = len(net.blocks)
    if result.best_epoch == 0:
        log.info(
            "Fine-tuning did not improve on the validation split; keeping the model with the frozen backbone."
        )
        return FineTuned(head, None, splits, result, k, n_blocks)

    new_splits = splits.with_features(
        tuner.features(inputs.train), tuner.features(inputs.val), tuner.features(inputs.test)
    )
    W, b = tuner.head_weights()
    tuned = FineTunedHead(W, b, getattr(head, "best_step_", None), result.best_epoch, result.epochs_run)
    from retrain.export import backbone_onnx_bytes

    return FineTuned(tuned, backbone_onnx_bytes(spec, net.cpu().eval()), new_splits, result, k, n_blocks)


def _check_settings(cfg) -> None:
    if cfg.fine_tune_epochs < 1:
        raise RetrainError(f"--fine_tune_epochs must be >= 1, got {cfg.fine_tune_epochs}")
    if not cfg.fine_tune_learning_rate > 0:
        raise RetrainError(f"--fine_tune_learning_rate must be > 0, got {cfg.fine_tune_learning_rate}")
    if cfg.class_balance not in CLASS_BALANCE:
        raise RetrainError(
            f"--class_balance must be one of {', '.join(CLASS_BALANCE)}, got {cfg.class_balance!r}"
        )


# -- the network's top part ----------------------------------------------------------------------


class _TopOfNet(nn.Module):
    """Blocks ``k..`` of a FeatureNet, then global average pooling: (N, C, h, w) -> (N, D).

    With ``preprocessing`` (k = 0) the input is uint8 pixels (N, H, W, 3), normalised first.
    The blocks are the backbone's own modules, so training this trains the backbone.
    """

    def __init__(self, blocks: Sequence[nn.Module], preprocessing=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.pixels = preprocessing is not None
        self.normalize = NormalizePixels(preprocessing) if self.pixels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


def _check_contract(name: str, net, size: int) -> None:
    """Fine-tuning runs ``blocks[k:]`` + average pooling on its own: make sure that is what forward() does."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = net(x)
        for block in net.blocks:
            x = block(x)
        got = x.mean(dim=(2, 3))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RetrainError(
            f"backbone {name!r} cannot be fine-tuned: its forward() is not its blocks followed by global "
            "average pooling, which fine-tuning relies on. Train without --fine_tune."
        )


# -- inputs of the top part, computed once ---------------------------------------------------------


@dataclass
class _TopInputs:
    """What enters the first unfrozen block, per split: activations (N, C, h, w) or, for k = 0, pixels."""

    train: np.ndarray  # undistorted training images, row i = train.paths[i]
    val: np.ndarray
    test: np.ndarray
    pool: np.ndarray  # rows training draws from: ``train`` itself, or copies of distorted variants
    pool_copies: int  # 0: pool is train; c > 0: row i * c + j is copy j of training image i

    @classmethod
    def compute(cls, cfg, spec, net, k, device, splits: Splits, distortions, copies) -> _TopInputs:
        from retrain.distort import iter_variant_pixels

        train, val, test = splits.train, splits.validation, splits.test
        size, resample = spec.preprocessing.input_size, spec.preprocessing.resample
        frozen = _frozen_part(spec, net, k, device)
        shape = _output_shape(frozen, size)
        rows = len(train.y) * (1 + copies) + len(val.y) + len(test.y)
        dtype = _storage_dtype(rows, shape, k)
        batch, workers = cfg.pixel_batch_size, cfg.num_workers or None

        def run_frozen(paths: Sequence[str]) -> np.ndarray:
            out = np.empty((len(paths), *shape), dtype)
            for idx, pixels in _pixel_batches(paths, size, resample, batch, workers):
                out[idx] = frozen(pixels)
            return out

        train_in, val_in, test_in = run_frozen(train.paths), run_frozen(val.paths), run_frozen(test.paths)
        if not copies:
            return cls(train_in, val_in, test_in, train_in, 0)
        pool = np.empty((len(train.y) * copies, *shape), dtype)
        keys = train.keys
        todo = [range(copies)] * len(train.y)
        for idx, cs, pixels in iter_variant_pixels(
            train.paths, keys, todo, distortions, size, resample=resample, batch_size=batch, workers=workers
        ):
            pool[idx * copies + cs] = frozen(pixels)
        return cls(train_in, val_in, test_in, pool, copies)


def _frozen_part(spec, net, k: int, device) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 pixels (B, H, W, 3) -> input of block k, as NumPy; the identity for k = 0."""
    if k == 0:
        return lambda pixels: pixels
    from retrain.engines import OnnxEngine, TorchEngine
    from retrain.export import backbone_onnx_bytes

    lower = nn.Sequential(*list(net.blocks)[:k]).eval()
    if device.type == "cuda":
        return TorchEngine(spec, "cuda", net=lower)
    # ONNX Runtime runs these convolutions several times faster than PyTorch on a CPU.
    with torch.no_grad():
        return OnnxEngine(backbone_onnx_bytes(spec, lower))


def _output_shape(frozen, size: int) -> tuple[int, ...]:
    return np.asarray(frozen(np.zeros((1, size, size, 3), np.uint8))).shape[1:]


def _storage_dtype(rows: int, shape: tuple[int, ...], k: int):
    if k == 0:
        return np.uint8
    total = _physical_memory()
    need = rows * math.prod(shape) * 4
    if need <= FP32_MEMORY_SHARE * total:
        return np.float32
    if need / 2 <= FP16_MEMORY_SHARE * total:
        log.info("Keeping the frozen activations as float16 (%.1f GiB) to fit in memory", need / 2 / 2**30)
        return np.float16
    raise RetrainError(
        f"fine-tuning would keep {need / 2 / 2**30:.1f} GiB of activations in memory ({rows} images), more than "
        f"this machine can spare. Unfreeze fewer blocks (--fine_tune_blocks), use fewer distorted copies "
        f"(--distorted_copies), or fewer images."
    )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _pixel_batches(
    paths: Sequence[str], size: int, resample: str, batch: int, workers: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices (B,), pixels (B, size, size, 3) uint8), decoding the next batch while this one runs."""

    def decode(path: str) -> np.ndarray:
        try:
            return decode_image(read_image_bytes(path), size, resample=resample)
        except ImageError as exc:
            raise RetrainError(
                f"cannot fine-tune on {path!r}: {exc.reason} (it was readable a moment ago)"
            ) from None

    for start, _, pixels in decode_ahead(list(paths), decode, batch, workers):
        yield np.arange(start, start + len(pixels)), np.stack(pixels)


# -- training ----------------------------------------------------------------------------------


class _Tuner:
    """The training loop: epochs, validation, early stopping, best weights, checkpoints."""

    def __init__(
        self,
        cfg: TrainConfig,
        spec: BackboneSpec,
        seed: int,
        labels: Sequence[str],
        top: _TopOfNet,
        head,
        inputs: _TopInputs,
        device,
        copies: int,
        y_train: np.ndarray,
        y_val: np.ndarray,
        *,
        checkpoint: str | os.PathLike | None,
        summaries_dir: str | os.PathLike | None,
        recipe: Recipe = Recipe(),
    ):
        self.cfg, self.device, self.recipe = cfg, device, recipe
        self.summaries_dir = summaries_dir
        self.labels = list(labels)
        self.inputs, self.copies = inputs, copies
        self.top = top.to(device).eval()  # eval for good: batch-norm statistics stay frozen
        n_features, n_classes = head.coef_.shape
        self.head = torch.nn.Linear(n_features, n_classes).to(device)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.asarray(head.coef_, np.float32).T))
            self.head.bias.copy_(torch.from_numpy(np.asarray(head.intercept_, np.float32)))
        self.backbone_params = [p for p in self.top.parameters()]
        for p in self.backbone_params:
            p.requires_grad_(True)
        lr = cfg.fine_tune_learning_rate
        head_group = {"params": list(self.head.parameters()), "lr": recipe.head_lr_multiplier * lr}
        if recipe.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                [{"params": self.backbone_params, "lr": lr}, head_group], weight_decay=recipe.weight_decay
            )
        else:
            # None ("chosen by the cross-fit") means none here: fine-tuning runs no cross-fit.
            head_group["weight_decay"] = cfg.weight_decay or 0.0
            self.optimizer = torch.optim.Adam([{"params": self.backbone_params, "lr": lr}, head_group])
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0  # optimizer steps taken, for the schedule
        self.batch = max(1, min(cfg.train_batch_size, MAX_BATCH))
        self.y_train = np.asarray(y_train, np.int64)
        self.y_val = np.asarray(y_val, np.int64)
        self.n_classes = n_classes
        self.sampler = ClassBalancedSampler(self.y_train, n_classes, cfg.class_balance)
        self.rng = np.random.default_rng([seed, 7])
        self.path = Path(checkpoint) if checkpoint is not None else None
        self.fingerprint = self._fingerprint(head, spec)
        self.steps_per_epoch = -(-len(self.y_train) // self.batch)
        self.total_steps = self.steps_per_epoch * cfg.fine_tune_epochs
        self.warmup_steps = round(recipe.warmup_epochs * self.steps_per_epoch)

    def log_estimate(self, seconds_so_far: float) -> float:
        """Time three training steps on a copy of the network and log what all the epochs will take."""
        top, head = copy.deepcopy(self.top), copy.deepcopy(self.head)
        params = list(top.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=0.0)  # the copy's weights do not change, nor do ours
        rows = np.arange(min(16, self.batch, len(self.inputs.pool)))  # small: the timing itself stays cheap
        y = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(head(top(self._tensor(self.inputs.pool[rows]))), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        per_image = min(times[1:]) / len(rows)
        # an epoch: every training draw forward + backward, the validation images forward (~1/3 of that)
        seconds = self.cfg.fine_tune_epochs * per_image * (len(self.y_train) + len(self.y_val) / 3)
        quality = "best quality: " if self.recipe == BEST_RECIPE else ""
        log.info(
            "%sfine-tuning %d backbone blocks for up to %d epochs of %d images: about %s on this %s "
            "(%.0f ms per image and epoch, measured; the frozen part took %.0f s)",
            quality,
            len(self.top.blocks),
            self.cfg.fine_tune_epochs,
            len(self.y_train),
            _duration(seconds),
            "GPU" if self.device.type == "cuda" else "CPU",
            1000 * per_image,
            seconds_so_far,
        )
        return seconds

    # -- one epoch ---------------------------------------------------------------------------
    def _epoch_rows(self) -> tuple[np.ndarray, np.ndarray]:
        return _rows(self.sampler, self.rng, self.copies)

    def _train_epoch(self) -> tuple[float, float]:
        rows, weights = self._epoch_rows()
        labels = self.y_train[rows // self.copies] if self.copies else self.y_train[rows]
        total_loss, correct = 0.0, 0
        for start in range(0, len(rows), self.batch):
            sl = slice(start, start + self.batch)
            x = self._tensor(self.inputs.pool[rows[sl]])  # (B, C, h, w) or (B, H, W, 3)
            y = torch.from_numpy(labels[sl]).to(self.device)
            w = torch.from_numpy(weights[sl]).to(self.device)
            logits = self.head(self.top(x))
            nll = torch.nn.functional.cross_entropy(
                logits, y, reduction="none", label_smoothing=self.recipe.label_smoothing
            )
            loss = (nll * w).sum() / w.sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            factor = self.recipe.factor(self.step, self.total_steps, self.warmup_steps)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            self.optimizer.step()
            self.step += 1
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        return total_loss / len(rows), correct / len(rows)

    def _tensor(self, array: np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return t if t.dtype == torch.uint8 else t.float()

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """(N, D) features of the current top part for cached inputs."""
        step = 256 if not self.top.pixels else 32
        out = np.empty((len(inputs), self.head.in_features), np.float32)
        with torch.inference_mode():
            for start in range(0, len(inputs), step):
                out[start : start + step] = (
                    self.top(self._tensor(inputs[start : start + step])).float().cpu().numpy()
                )
        return out

    def _validate(self) -> tuple[float | None, float | None]:
        if not len(self.y_val):
            return None, None
        feats = torch.from_numpy(self.features(self.inputs.val)).to(self.device)
        with torch.inference_mode():
            logits = self.head(feats)
            y = torch.from_numpy(self.y_val).to(self.device)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            acc = float((logits.argmax(1) == y).float().mean())
        return acc, loss

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> FineTuneResult:
        cfg = self.cfg
        state = self._load_checkpoint() if cfg.resume and self.path is not None else None
        if state is None:
            acc, loss = self._validate()
            history = [EpochReport(0, None, None, acc, loss)]
            best = {"epoch": 0, "score": _score(acc, loss), "weights": self._weights()}
            epoch, bad_epochs, done = 0, 0, False
            resumed = 0
            self._log(history[0], best=True)
        else:
            history, best, epoch, bad_epochs, done = state
            resumed = epoch
        writer = self._summary_writer()
        patience = cfg.fine_tune_patience
        try:
            while not done and epoch < cfg.fine_tune_epochs:
                t0 = time.perf_counter()
                epoch += 1
                train_loss, train_acc = self._train_epoch()
                acc, loss = self._validate()
                report = EpochReport(epoch, train_loss, train_acc, acc, loss, time.perf_counter() - t0)
                history.append(report)
                improved = acc is None or _score(acc, loss) > best["score"]
                if improved:
                    best = {"epoch": epoch, "score": _score(acc, loss), "weights": self._weights()}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                self._log(report, best=improved)
                if writer is not None:
                    writer.scalar("fine_tune/train_loss", train_loss, epoch)
                    writer.scalar("fine_tune/train_accuracy", train_acc, epoch)
                    if acc is not None:
                        writer.scalar("fine_tune/validation_accuracy", acc, epoch)
                        writer.scalar("fine_tune/validation_loss", loss, epoch)
                    writer.flush()
                stop = acc is not None and patience > 0 and bad_epochs >= patience
                done = stop or epoch >= cfg.fine_tune_epochs
                self._save_checkpoint(history, best, epoch, bad_epochs, done)
                if stop:
                    log.info("No validation improvement for %d epochs: stopping early", patience)
        finally:
            if writer is not None:
                writer.close()
        if self.recipe.keep == "last":
            best = {"epoch": epoch}  # the weights are the last epoch's already
        else:
            self._set_weights(best["weights"])
        stopped_early = epoch < cfg.fine_tune_epochs
        if not len(self.y_val):
            log.warning("No validation images: fine-tuning ran all %d epochs and keeps the last one", epoch)
        else:
            log.info(
                "Kept the weights of fine-tuning epoch %d%s (validation accuracy %.1f%% before, %.1f%% after)",
                best["epoch"],
                ", the last" if self.recipe.keep == "last" else "",
                100 * history[0].validation_accuracy,
                100 * history[best["epoch"]].validation_accuracy,
            )
        return FineTuneResult(epoch, best["epoch"], stopped_early, history, resumed)

    def _log(self, r: EpochReport, *, best: bool) -> None:
        val = (
            f"validation accuracy = {100 * r.validation_accuracy:.1f}% (N={len(self.y_val)}), "
            f"cross entropy = {r.validation_loss:.4f}"
            if r.validation_accuracy is not None
            else "no validation"
        )
        if r.epoch == 0:
            log.info("Fine-tune epoch 0 (before): %s", val)
            return
        log.info(
            "Fine-tune epoch %d/%d: train loss = %.4f, train accuracy = %.1f%%, %s%s (%.1f s)",
            r.epoch,
            self.cfg.fine_tune_epochs,
            r.train_loss,
            100 * r.train_accuracy,
            val,
            " *" if best else "",
            r.seconds,
        )

    def _summary_writer(self):
        if self.summaries_dir is None:
            return None
        try:
            from retrain.summaries import EventWriter

            return EventWriter(Path(self.summaries_dir) / "fine_tune")
        except OSError as exc:
            log.warning("cannot write fine-tuning summaries: %s", exc)
            return None

    # -- weights -----------------------------------------------------------------------------
    def _weights(self) -> dict:
        """A CPU copy of everything that trains (the top blocks' state and the head)."""
        return {
            "top": {k: v.detach().cpu().clone() for k, v in self.top.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
        }

    def _set_weights(self, weights: dict) -> None:
        self.top.load_state_dict(weights["top"])
        self.head.load_state_dict(weights["head"])

    def head_weights(self) -> tuple[np.ndarray, np.ndarray]:
        W = self.head.weight.detach().cpu().numpy().T.copy()  # (D, C)
        return W, self.head.bias.detach().cpu().numpy().copy()

    # -- checkpoints -------------------------------------------------------------------------
    def _fingerprint(self, head, spec: BackboneSpec) -> dict:
        """What a checkpoint must agree on to be continued."""
        cfg = self.cfg
        digest = hashlib.sha1()
        digest.update(np.ascontiguousarray(head.coef_, np.float32).tobytes())
        digest.update(np.ascontiguousarray(head.intercept_, np.float32).tobytes())
        digest.update(np.ascontiguousarray(self.y_train).tobytes())
        return {
            "backbone": spec.name,
            "weights": spec.weights_id,
            "blocks": str(cfg.fine_tune_blocks),
            "labels": self.labels,
            "learning_rate": float(cfg.fine_tune_learning_rate),
            "batch": self.batch,
            "class_balance": cfg.class_balance,
            "copies": self.copies,
            "distortions": [
                bool(cfg.flip_left_right),
                float(cfg.random_crop),
                float(cfg.random_scale),
                float(cfg.random_brightness),
            ],
            "head_and_labels": digest.hexdigest(),
            "recipe": dataclasses.asdict(self.recipe),
            "epochs": cfg.fine_tune_epochs if self.recipe.schedule != "constant" else None,
        }

    def _save_checkpoint(self, history, best, epoch, bad_epochs, done) -> None:
        if self.path is None:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "epoch": epoch,
            "step": self.step,
            "bad_epochs": bad_epochs,
            "done": done,
            "weights": self._weights(),
            "optimizer": self.optimizer.state_dict(),
            "best_epoch": best["epoch"],
            "best_score": list(best["score"]),
            "best_weights": best["weights"],
            "history": [dataclasses.asdict(r) for r in history],
            "rng": json.dumps(self.rng.bit_generator.state),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    def _load_checkpoint(self):
        if not self.path.exists():
            log.info("--resume: no fine-tuning checkpoint at %s; fine-tuning from the start", self.path)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
            raise RetrainError(
                f"--resume: cannot read the fine-tuning checkpoint {str(self.path)!r} ({exc}); "
                "remove it to fine-tune from the start"
            ) from None
        if state.get("version") != CHECKPOINT_VERSION or json.loads(state["fingerprint"]) != self.fingerprint:
            raise RetrainError(
                f"--resume: the fine-tuning checkpoint {str(self.path)!r} belongs to a run with other settings, "
                "images or new-layer weights; run with the same flags, or remove it to fine-tune from the start"
            )
        self._set_weights(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.step = int(state["step"])
        history = [EpochReport(**r) for r in state["history"]]
        best = {
            "epoch": state["best_epoch"],
            "score": tuple(state["best_score"]),
            "weights": state["best_weights"],
        }
        log.info("--resume: fine-tuning continues after epoch %d of %s", state["epoch"], self.path)
        return history, best, state["epoch"], state["bad_epochs"], state["done"]


def epoch_rows(
    y: np.ndarray, n_classes: int, policy: str, rng: np.random.Generator, copies: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of training draws, as many as there are images, by the ``--class_balance`` policy
    (see :mod:`retrain.sampling`). Returns (rows (N,), loss weights (N,)); with ``copies`` > 0 a row
    is ``image * copies + copy`` with a random copy."""
    return _rows(ClassBalancedSampler(np.asarray(y, np.int64), n_classes, policy), rng, copies)


def _rows(
    sampler: ClassBalancedSampler, rng: np.random.Generator, copies: int
) -> tuple[np.ndarray, np.ndarray]:
    images, weights = sampler.epoch(rng)
    rows = images * copies + rng.integers(0, copies, size=len(images)) if copies else images
    return rows, weights


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _score(acc: float | None, loss: float | None) -> tuple[float, float]:
    return (-1.0, -math.inf) if acc is None else (acc, -loss)
