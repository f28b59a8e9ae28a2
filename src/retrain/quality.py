"""``--quality best``: the backbone whose features cross-fit best, then fine-tuning kept only if it wins.

Three stages, each decided on training + validation images only (the test split is scored, never consulted):

1. **Backbone.** With ``--architecture`` left at its default, the features of every candidate in
   :data:`CANDIDATES` (all offline, each at its native resolution) are extracted through the cache, and the
   default run's 5-fold cross-fit (:func:`retrain.fit.plan_final_fit`) scores each on the training +
   validation images. Another backbone replaces the default one only if it gets clearly more of those images
   right out of fold (:func:`clearly_better`); the log says every candidate's figure. On grey textures and
   product shots Lite2's features beat Lite0's by several points; on everyday photos they are level, and a
   plain "highest out-of-fold accuracy" rule lost test accuracy there (docs/finetune.md).
2. **The frozen model**: exactly the default run's on that backbone: the new layer fitted on training +
   validation for the steps and weight decay the cross-fit chose.
3. **Fine-tuning** (``finetune.BEST_RECIPE``): a second new layer is fitted on the training split alone (same
   steps and decay), the top blocks are fine-tuned from it with the validation split held out, and the
   last epoch of the cosine schedule is compared with the frozen model on the *same* validation images
   (the frozen model's out-of-fold predictions of them, from layers that never saw them). The fine-tuned
   model is exported only if it is more accurate there; otherwise the frozen model is, and the log says so.
   So best mode is never worse on validation than the default run it starts from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrain.backbones import BackboneSpec, get_backbone
from retrain.config import TrainConfig

log = logging.getLogger("retrain")

# Offline backbones best mode chooses among, the default first. MobileNet V2 was a candidate and was dropped: on
# 4 sets x 5 seeds it won the out-of-fold race 8 times and lost test accuracy by doing so (docs/finetune.md).
CANDIDATES = ("efficientnet_lite0", "efficientnet_lite2")
# How far a candidate must beat the default backbone, in standard deviations of the paired difference.
CLEARLY = 1.0


@dataclass
class BackboneChoice:
    """Which backbone best mode uses and the out-of-fold accuracy of each candidate that decided it."""

    name: str
    out_of_fold: dict[str, float] = field(default_factory=dict)
    images: int = 0  # training + validation images the cross-fits scored
    seconds: dict[str, float] = field(default_factory=dict)  # features + cross-fit, per candidate
    reason: str = ""  # why no choice was made (the run's own backbone is used), or ""

    def to_dict(self) -> dict:
        return {
            "backbone": self.name,
            "out_of_fold": self.out_of_fold,
            "images": self.images,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "reason": self.reason,
        }


def why_not_choose(cfg: TrainConfig) -> str:
    """Why best mode keeps the run's backbone instead of choosing one ("" when it chooses)."""
    if cfg.tfhub_module or cfg.architecture != TrainConfig().architecture:
        return "--architecture was given"
    if cfg.engine == "ray" or cfg.extraction_precision != "float32":
        return "features come from a Ray cluster or a reduced-precision backbone"
    return ""


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """The cross-fits of the candidates log what the run's own cross-fit logs: keep the log to one summary."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def out_of_fold_hits(cfg: TrainConfig, dataset, table, seed: int) -> dict[str, bool]:
    """The default run's cross-fit on ``table``'s training + validation features: for each of those images
    (by path), whether the layer that did not see it got it right. Empty when there are too few to cross-fit."""
    from retrain.fit import WEIGHT_DECAYS, labelled_groups, plan_final_fit
    from retrain.splits import split_features
    from retrain.train import head_params

    splits = split_features(
        dataset,
        table,
        validation_percentage=cfg.validation_percentage,
        testing_percentage=cfg.testing_percentage,
    )
    labelled = splits.train + splits.validation
    plan = plan_final_fit(
        labelled.X,
        labelled.y,
        labelled_groups(labelled.keys, labelled.paths),
        n_classes=len(splits.labels),
        head_params=head_params(cfg),
        mode="train+val",
        seed=seed,
        weight_decays=WEIGHT_DECAYS if cfg.weight_decay is None else None,
        solver=cfg.head_solver,
    )
    if plan.cross is None:
        return {}
    hits = plan.cross.logits.argmax(axis=1) == labelled.y
    return dict(zip(map(str, labelled.paths), map(bool, hits)))


def clearly_better(base: dict[str, bool], other: dict[str, bool], z: float = CLEARLY) -> int:
    """How many more images ``other`` gets right than ``base`` (same images), if that is more than ``z``
    standard deviations of the paired difference (the sign test's sqrt of the discordant pairs); else 0.

    With a few hundred photos the out-of-fold accuracies of two backbones differ by a point or two by chance;
    switching on such a difference lost test accuracy on everyday photos (docs/finetune.md)."""
    shared = base.keys() & other.keys()
    wins = sum(other[p] and not base[p] for p in shared)
    losses = sum(base[p] and not other[p] for p in shared)
    gain = wins - losses
    return gain if gain > z * math.sqrt(wins + losses) else 0


def choose_backbone(
    cfg: TrainConfig, dataset, spec: BackboneSpec, table, seed: int, candidates: Sequence[str] = CANDIDATES
):
    """(spec, feature table, BackboneChoice): the first candidate (the default backbone) unless another's
    features cross-fit clearly better on training + validation (:func:`clearly_better`; the largest gain
    wins). ``spec`` / ``table`` are the run's own backbone and its features (one of the candidates)."""
    from retrain.features import extract_features

    reason = why_not_choose(cfg)
    if reason:
        log.info("best quality: backbone %s (%s, so no backbone choice)", spec.name, reason)
        return spec, table, BackboneChoice(spec.name, reason=reason)
    specs, tables, hits = {}, {}, {}
    choice = BackboneChoice(spec.name)
    for name in candidates:
        t0 = time.perf_counter()
        specs[name] = spec if name == spec.name else get_backbone(name)
        tables[name] = (
            table
            if name == spec.name
            else extract_features(
                dataset,
                architecture=specs[name],
                bottleneck_dir=cfg.bottleneck_dir,
                model_dir=cfg.model_dir or None,
                device=cfg.device,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                progress=not cfg.quiet,
            )
        )
        with _quiet(log):
            hits[name] = out_of_fold_hits(cfg, dataset, tables[name], seed)
        choice.out_of_fold[name] = float(np.mean(list(hits[name].values()))) if hits[name] else math.nan
        choice.images = len(hits[name])
        choice.seconds[name] = time.perf_counter() - t0
    default = candidates[0]
    if not hits[default]:
        choice.reason = "too few images to cross-fit"
        log.info("best quality: backbone %s (%s)", spec.name, choice.reason)
        return spec, table, choice
    gains = {n: clearly_better(hits[default], hits[n]) for n in candidates[1:]}
    winner = max(gains, key=gains.get, default=default)  # max keeps the first (cheaper) of equal gains
    choice.name = winner if gains.get(winner, 0) > 0 else default
    others = ", ".join(f"{n} {100 * a:.1f}%" for n, a in choice.out_of_fold.items() if n != choice.name)
    verdict = (
        f"{gains[choice.name]} more images right than {default}"
        if choice.name != default
        else f"no other backbone is clearly better (by more than {CLEARLY:g} sd of the paired difference)"
    )
    log.info(
        "best quality: backbone %s: out-of-fold accuracy %.1f%% on the %d training+validation images, vs %s; "
        "%s (the default run's cross-fit on each backbone's features; %.0f s in all)",
        choice.name,
        100 * choice.out_of_fold[choice.name],
        choice.images,
        others,
        verdict,
        sum(choice.seconds.values()),
    )
    return specs[choice.name], tables[choice.name], choice


# -- the time estimate, before any work -----------------------------------------------------------------


def step_seconds_per_image(spec: BackboneSpec, blocks: str | int, rows: int = 8) -> tuple[float, float]:
    """(fine-tuning s per image and epoch, forward s per image) of ``spec``, timed on random input here.

    Two forward + backward steps of the top ``blocks`` blocks on ``rows`` random activations (the second one
    counts), and one forward pass of the whole network (an upper bound of the ONNX Runtime extraction)."""
    import torch

    from retrain.finetune import first_unfrozen_block

    net = spec.build().eval()
    k = first_unfrozen_block(_blocks_for(blocks, len(net.blocks)), len(net.blocks))
    size = spec.preprocessing.input_size
    x = torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(0))
    top = torch.nn.Sequential(*list(net.blocks)[k:])
    with torch.inference_mode():
        t0 = time.perf_counter()
        for block in net.blocks[:k]:
            x = block(x)
        top(x)
        forward = (time.perf_counter() - t0) / rows
    x = x.clone()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = top(x).mean(dim=(2, 3)).sum()
        out.backward()
        times.append(time.perf_counter() - t0)
    return times[-1] / rows, forward


def _blocks_for(blocks: str | int, n_blocks: int) -> str | int:
    """Best mode's block count on a backbone with fewer blocks: all of them (as fine_tune() does)."""
    return "all" if str(blocks).isdigit() and int(blocks) > n_blocks else blocks


def estimate_seconds(cfg: TrainConfig, n_images: int, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Per backbone: (features of ``n_images``, fine-tuning) seconds on this machine, measured on random input."""
    share = max(0.0, 100 - cfg.validation_percentage - cfg.testing_percentage) / 100
    n_train, n_val = share * n_images, cfg.validation_percentage / 100 * n_images
    out = {}
    for name in names:
        per_image, forward = step_seconds_per_image(get_backbone(name), cfg.fine_tune_blocks)
        # an epoch: every training image forward + backward, validation forward (~1/3); the frozen part once
        tune = cfg.fine_tune_epochs * per_image * (n_train + n_val / 3) + forward * n_images
        out[name] = (forward * n_images, tune)
    return out


def log_estimate(cfg: TrainConfig, n_images: int, chooses: bool) -> dict[str, tuple[float, float]]:
    """The up-front line: what choosing the backbone and fine-tuning will take, before any of it runs."""
    from retrain.finetune import _duration

    names = CANDIDATES if chooses else (cfg.tfhub_module or cfg.architecture,)
    try:
        est = estimate_seconds(cfg, n_images, names)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop the run
        log.info("best quality: no time estimate (%s)", exc)
        return {}
    features = sum(f for f, _ in est.values())
    tunes = sorted(t for _, t in est.values())
    tune, total = _span(tunes[0], tunes[-1]), _span(features + tunes[0], features + tunes[-1])
    log.info(
        "best quality: about %s on this machine for %d images: %s, then fine-tuning %s blocks for %d "
        "epochs (%s%s); cached features make the first part shorter. A measured estimate of the fine-tuning "
        "follows before its first epoch.",
        total,
        n_images,
        f"features with {len(names)} backbones and a cross-fit on each (up to {_duration(features)})"
        if chooses
        else f"features (up to {_duration(features)})",
        cfg.fine_tune_blocks,
        cfg.fine_tune_epochs,
        tune,
        ", by the backbone chosen" if " to " in tune else "",
    )
    return est


def _span(low: float, high: float) -> str:
    """ "2 min" or "2 min to 5 min": one figure when both round to the same."""
    from retrain.finetune import _duration

    a, b = _duration(low), _duration(high)
    return a if a == b else f"{a} to {b}"


# -- fine-tuning, kept only if it beats the frozen model -------------------------------------------------


@dataclass
class BestOutcome:
    """What best mode exports: the fine-tuned network, or (``backbone_onnx`` None) the frozen model."""

    head: object
    backbone_onnx: bytes | None
    splits: object  # retrain.splits.Splits; features of the fine-tuned backbone when it was kept
    report: dict


def frozen_validation_accuracy(plan, n_train: int, y_val: np.ndarray) -> float | None:
    """The frozen model's accuracy on the validation images, each predicted by a cross-fit layer that did not
    see it (the cross-fit's rows are training then validation)."""
    if plan.cross is None or not len(y_val):
        return None
    logits = plan.cross.logits[n_train : n_train + len(y_val)]
    return float((logits.argmax(axis=1) == np.asarray(y_val)).mean())


def beats(tuned: float | None, frozen: float, n: int) -> bool:
    """Whether accuracy ``tuned`` is more images right of ``n`` than ``frozen``. Compared as counts: the
    fine-tuned figure comes from float32 arithmetic, and 20/29 in float32 (0.68965518) exceeds 20/29 in float64
    (0.68965517), which kept a fine-tuned model that had only tied the frozen one."""
    return tuned is not None and round(tuned * n) > round(frozen * n)


def fine_tune_or_keep(
    cfg: TrainConfig, spec: BackboneSpec, seed: int, splits, plan, frozen_head, *, checkpoint, summaries_dir
) -> BestOutcome:
    """Fine-tune from a new layer fitted on the training split; keep it only if its last epoch beats the
    frozen model (``frozen_head``, fitted as ``plan`` says) on the validation images."""
    from retrain.finetune import BEST_RECIPE, fine_tune
    from retrain.head import SoftmaxHead
    from retrain.logreg import LogisticHead
    from retrain.train import head_params

    n_train, y_val = len(splits.train.y), splits.validation.y
    frozen_acc = frozen_validation_accuracy(plan, n_train, y_val)
    keep = BestOutcome(frozen_head, None, splits, {"fine_tuned": False})
    if frozen_acc is None:
        log.info("best quality: no validation images to judge fine-tuning by; keeping the frozen model")
        keep.report["reason"] = "no validation images"
        return keep
    # The start of fine-tuning: the new layer on the training split alone, so validation stays unseen.
    if plan.c is not None:  # the L-BFGS layer at the cross-fit's C, for the training split's size
        start = LogisticHead(l2=plan.l2_for(n_train), balanced=cfg.class_balance == "weight")
    else:
        params = {**head_params(cfg), "steps": plan.steps, "weight_decay": plan.weight_decay}
        start = SoftmaxHead(**params, seed=seed)
    start.fit(splits.train.X, splits.train.y, n_classes=len(splits.labels))
    tuned = fine_tune(
        start,
        splits,
        architecture=spec,
        config=cfg,
        seed=seed,
        checkpoint=checkpoint,
        summaries_dir=summaries_dir,
        recipe=BEST_RECIPE,
    )
    tuned_acc = tuned.result.history[tuned.result.best_epoch].validation_accuracy
    report = {
        **tuned.report(),
        "validation_images": len(y_val),
        "fine_tuned_validation_accuracy": tuned_acc,
        "frozen_validation_accuracy": frozen_acc,
    }
    wins = tuned.backbone_onnx is not None and beats(tuned_acc, frozen_acc, len(y_val))
    report["fine_tuned"] = bool(wins)
    verdict = (
        "keeping the fine-tuned network"
        if wins
        else "keeping the frozen-backbone model fitted on all training+validation images (fine-tuning did not "
        "beat it)"
    )
    log.info(
        "best quality: fine-tuned %.1f%% vs frozen %.1f%% on the same %d validation images (the frozen model's "
        "out-of-fold predictions of them): %s",
        100 * tuned_acc if tuned_acc is not None else math.nan,
        100 * frozen_acc,
        len(y_val),
        verdict,
    )
    if not wins:
        keep.report = report
        return keep
    return BestOutcome(tuned.head, tuned.backbone_onnx, tuned.splits, report)
