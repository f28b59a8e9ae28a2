"""Which images the exported layer learns from, and how many steps it takes: decided honestly.

retrain.py fitted the final layer on the training split alone and picked its weights by the few
validation images, so 20% of the labelled photos never taught the model anything. Here one
cross-fit over training + validation scores every one of those images with a layer that never saw
it and chooses the layer's settings by that out-of-fold accuracy (its regularisation, or its number
of steps); the final layer is then fitted on all of them. The test split is not looked at before it
is scored, so the printed test accuracy stays an honest estimate; by default the test images are
folded in only after that.

``--final_fit`` says what the exported layer is fitted on:

* ``all`` (default): as ``train+val``, then, after the test accuracy is printed, fitted again with the test
  images folded in, so that every labelled photo teaches the exported layer (that printed figure describes
  the layer before this last fit: a cautious estimate for the exported one, which learned from more photos);
* ``train+val``: training + validation; the test images never reach the exported layer. With
  ``--head_solver lbfgs`` (the default) the layer is an L2-regularised logistic regression solved to
  convergence (:mod:`retrain.logreg`), its strength chosen by the cross-fit
  (:func:`retrain.crossfit.cross_fit_l2`) unless ``--weight_decay`` gives one; with ``steps``, the
  cross-fit chooses the number of mini-batch steps (and the weight decay, from :data:`WEIGHT_DECAYS` (today
  only 0), unless ``--weight_decay`` gives one);
* ``train``: retrain.py's way: the training split, ``--how_many_training_steps`` steps, the weights of
  the step with the best validation accuracy.

The cross-fit runs once per run in every mode; its :class:`~retrain.crossfit.CrossFit` is kept for the
stages after training (calibration, the unknown threshold, the label-error report).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrain.crossfit import DEFAULT_FOLDS, CrossFit, cross_fit, cross_fit_l2
from retrain.data import same_image_groups
from retrain.errors import RetrainError
from retrain.logreg import strength

log = logging.getLogger("retrain")

FINAL_FITS = ("train", "train+val", "all")
SOLVERS = ("lbfgs", "steps")
# The L2 strengths (--weight_decay) the cross-fit chooses from when the flag is not given. One value: the
# grid (0, 1e-4, 1e-3, 1e-2), fitted in the same batched loop, multiplied the cross-fit's cost by 3.2 and
# moved no set's test accuracy beyond the noise (docs/benchmarks.md, "Accuracy on real photo sets").
# plan_final_fit still takes a grid (``weight_decays``) for callers that want one.
WEIGHT_DECAYS = (0.0,)


def labelled_groups(keys: Sequence[bytes], paths: Sequence[str]) -> list[int]:
    """One group id per row: rows with the same content key or the same ``_nohash_`` name share one
    (:func:`retrain.data.same_image_groups`, the split's own grouping), so a row can never be scored by
    a layer that trained on a copy of it or on a near-duplicate its owner marked with ``_nohash_``."""
    return same_image_groups(paths, keys)


@dataclass
class FitPlan:
    """What the final layer is fitted on and for how many steps, and the cross-fit that decided it.

    ``cross`` is None only when cross-fitting was impossible (fewer than two distinct images).
    ``with_validation``: the fit uses training + validation rows and no step selection of its own;
    otherwise it uses the training rows and keeps its best step on the validation split.
    """

    mode: str
    steps: int
    with_validation: bool
    cross: CrossFit | None
    weight_decay: float = 0.0  # the final layer's L2 strength: the flag's, or the cross-fit's choice
    c: float | None = (
        None  # the L-BFGS layer's scikit-learn C (its strength is 1 / (C n) for n rows); None: steps
    )

    def l2_for(self, n: int) -> float:
        """The L-BFGS layer's L2 strength for ``n`` rows (the chosen C carries over to more rows)."""
        return strength(self.c, n)

    @property
    def validation_accuracy(self) -> float | None:
        """The honest accuracy estimate available before testing: out-of-fold, in the train+val modes."""
        return self.cross.accuracy if self.with_validation and self.cross is not None else None


def plan_final_fit(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence[int],
    *,
    n_classes: int,
    head_params: dict,
    mode: str = "train+val",
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    weight_decays: Sequence[float] | None = None,
    solver: str = "steps",
) -> FitPlan:
    """Cross-fit training + validation rows ``X`` (N, D), ``y`` (N,) once and decide the final fit.

    ``head_params`` are the final layer's :class:`~retrain.head.SoftmaxHead` arguments; their
    ``steps`` is the most the cross-fit tries (``--how_many_training_steps``). ``weight_decays``: the
    L2 strengths the cross-fit chooses from (default: only ``head_params``' ``weight_decay``).
    ``solver="lbfgs"`` (with mode train+val or all): the layer is solved by :mod:`retrain.logreg` and the
    cross-fit chooses its C (:func:`~retrain.crossfit.cross_fit_l2`); a ``weight_decay`` in
    ``head_params`` with ``weight_decays=None`` fixes it instead.
    """
    if mode not in FINAL_FITS:
        raise RetrainError(f"--final_fit must be one of {', '.join(FINAL_FITS)}, got {mode!r}")
    if solver not in SOLVERS:
        raise RetrainError(f"--head_solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver == "lbfgs" and mode != "train":
        return _plan_l2(X, y, groups, n_classes, head_params, mode, folds, seed, weight_decays)
    try:
        cross = cross_fit(
            X,
            y,
            n_classes=n_classes,
            head_params=head_params,
            folds=folds,
            groups=groups,
            seed=seed,
            weight_decays=weight_decays,
        )
    except ValueError as exc:
        log.warning("No cross-fit (%s): the final layer trains for all %d steps", exc, head_params["steps"])
        cross = None
    with_validation = mode != "train" and cross is not None
    steps = cross.best_steps if with_validation else int(head_params["steps"])
    if cross is not None:
        decay = cross.weight_decay
    else:  # nothing to choose by: the flag's value, or no decay
        decay = float(head_params.get("weight_decay") or 0.0) if weight_decays is None else min(weight_decays)
    plan = FitPlan(mode=mode, steps=steps, with_validation=with_validation, cross=cross, weight_decay=decay)
    _log_plan(plan, len(y), folds)
    return plan


def _plan_l2(X, y, groups, n_classes, head_params, mode, folds, seed, weight_decays) -> FitPlan:
    """The L-BFGS layer's plan: C chosen by the cross-fit, or the one ``--weight_decay`` means for N rows."""
    given = weight_decays is None and float(head_params.get("weight_decay") or 0.0) > 0
    cs = (strength(float(head_params["weight_decay"]), len(y)),) if given else None
    balanced = head_params.get("class_balance") == "weight"
    try:
        cross = cross_fit_l2(
            X,
            y,
            n_classes=n_classes,
            folds=folds,
            groups=groups,
            seed=seed,
            balanced=balanced,
            **({"cs": cs} if cs else {}),
        )
    except ValueError as exc:  # as for the step solver: the validation split stays out, to judge the layer
        c = cs[0] if cs else 1.0
        log.warning("No cross-fit (%s): the final layer is solved on the training split with C = %g", exc, c)
        return FitPlan(mode, int(head_params["steps"]), False, None, strength(c, len(y)), c)
    decay = float(head_params["weight_decay"]) if given else cross.weight_decay  # the flag's, exactly
    plan = FitPlan(mode, int(head_params["steps"]), True, cross, decay, cross.c)
    _log_plan(plan, len(y), folds)
    return plan


def _log_plan(plan: FitPlan, n: int, folds: int) -> None:
    cross = plan.cross
    if cross is None:
        return
    if plan.c is not None:
        _log_l2_plan(plan, n)
        return
    k = int(cross.fold.max()) + 1
    curve = ", ".join(f"{s}: {100 * a:.1f}%" for s, a in zip(cross.curve_steps, cross.curve_accuracy))
    log.info("Out-of-fold accuracy by number of steps (N=%d, %d folds): %s", n, k, curve)
    where = f"all {n}" if plan.with_validation else "the training split only (--final_fit train)"
    decay = f"weight decay {cross.weight_decay:g}"
    if len(cross.decay_accuracy) > 1:
        tried = ", ".join(f"{d:g}: {100 * a:.1f}%" for d, a in cross.decay_accuracy.items())
        decay += f" (chosen by the cross-fit; best out-of-fold accuracy by weight decay: {tried})"
    log.info(
        "Cross-fitting %d folds on %d training+validation images: best at %d steps, %s (out-of-fold accuracy "
        "%.1f%%, %.1f s); final layer fitted on %s",
        k,
        n,
        cross.best_steps,
        decay,
        100 * cross.accuracy,
        cross.seconds,
        where,
    )


def _log_l2_plan(plan: FitPlan, n: int) -> None:
    cross = plan.cross
    k = int(cross.fold.max()) + 1
    if len(cross.curve_c) > 1:
        curve = ", ".join(
            f"{c:.3g}: {100 * a:.1f}% / {e:.3f}"
            for c, a, e in zip(cross.curve_c, cross.curve_accuracy, cross.curve_loss)
        )
        log.info("Out-of-fold accuracy / cross entropy by regularisation C (N=%d, %d folds): %s", n, k, curve)
    log.info(
        "Cross-fitting %d folds on %d training+validation images: best at C = %.3g by the out-of-fold cross "
        "entropy (L2 strength %.3g; out-of-fold accuracy %.1f%%, %.1f s); final layer solved (L-BFGS) on "
        "all %d",
        k,
        n,
        plan.c,
        plan.weight_decay,
        100 * cross.accuracy,
        cross.seconds,
        n,
    )


def log_refit_with_test(test_accuracy: float | None, n_fitted: int, n_test: int) -> None:
    """The ``--final_fit all`` notice: the exported layer has seen the test images."""
    before = f" ({100 * test_accuracy:.1f}%)" if test_accuracy is not None else ""
    log.info(
        "Every labelled photo counts (--final_fit all): the final layer was fitted again on all %d images, the %d "
        "test images included. The test accuracy above%s was measured before, by a layer that had not seen them; "
        "for the exported layer, which learned from more photos, it is a cautious estimate. --final_fit "
        "train+val keeps the test images out of the exported layer.",
        n_fitted,
        n_test,
        before,
    )
