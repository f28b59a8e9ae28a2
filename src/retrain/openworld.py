"""The open-world stage: calibrate the confidence and fit the unknown score, from arrays.

Inputs are the labelled rows the final layer was fitted on (features, labels), held-out
predictions for them -- the out-of-fold logits of the run's one :func:`retrain.crossfit.cross_fit`
when there is one, else the validation split -- the final layer, and the test rows for reporting.
Outputs are a temperature, the unknown-score statistics with a threshold, and the numbers
for the log, ``metrics.json`` and the manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from retrain.calibrate import Calibration, calibrate
from retrain.data import printable
from retrain.openset import DEFAULT_ACCEPT, UnknownModel, fit_unknown

log = logging.getLogger("retrain")

CALIBRATION_CHOICES = ("temperature", "none")


@dataclass
class OpenWorld:
    calibration: Calibration
    unknown: UnknownModel | None
    test_unknown_rate: float | None  # share of known test images above the threshold
    seconds: float

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    def manifest(self) -> dict:
        """Entries for the model's manifest: ``calibration`` and (with a score) ``unknown``."""
        out = {"calibration": self.calibration.manifest()}
        if self.unknown is not None:
            out["unknown"] = self.unknown.manifest()
        return out

    def metrics(self) -> dict:
        out = {"calibration": self.calibration.to_dict(), "open_world_seconds": round(self.seconds, 3)}
        if self.unknown is not None:
            out["unknown"] = {**self.unknown.to_dict(), "test_called_unknown": _round(self.test_unknown_rate)}
        return out


def _round(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def fit_open_world(
    *,
    labels: list[str],
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    held_out_logits: np.ndarray,
    held_out_rows: np.ndarray,
    fold: np.ndarray,
    held_out_name: str,
    coef: np.ndarray,
    intercept: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    calibration: str = "temperature",
    unknown_threshold: float | None = None,
) -> OpenWorld:
    """Temperature and unknown score for a layer ``coef`` (D, C), ``intercept`` (C,).

    ``X_fit`` (N, D), ``y_fit`` (N,): the labelled rows, all of which the unknown statistics use.
    ``held_out_logits`` (M, C) are predictions for rows ``held_out_rows`` (M,) of them by layers
    that did not see those rows; ``fold`` (N,) says which held-out fold each row is in (-1: none),
    for the out-of-fold unknown scores. ``held_out_name``: "out_of_fold" or "validation".
    """
    if calibration not in CALIBRATION_CHOICES:
        raise ValueError(f"calibration must be one of {CALIBRATION_CHOICES}, got {calibration!r}")
    t0 = time.perf_counter()
    y_fit = np.asarray(y_fit, np.int64)
    test_logits = np.asarray(X_test, np.float32) @ coef + intercept  # (T, C)
    cal = calibrate(
        held_out_logits,
        y_fit[held_out_rows],
        fitted_on=held_out_name,
        measure={"test": (test_logits, y_test)},
        enabled=calibration == "temperature",
    )
    unknown = fit_unknown(X_fit, y_fit, fold, labels=labels, X_test=X_test, y_test=y_test,
                          threshold=unknown_threshold, accept=DEFAULT_ACCEPT)
    rate = None
    if len(y_test):
        rate = float((unknown.stats.score(X_test) > unknown.threshold).mean())
    result = OpenWorld(cal, unknown, rate, time.perf_counter() - t0)
    _log(result, labels)
    return result


def _log(ow: OpenWorld, labels: list[str]) -> None:
    cal = ow.calibration

    def ece(name: str) -> str:
        if name not in cal.before:
            return ""
        return f"{name.replace('_', '-')} {100 * cal.before[name].ece:.1f}% -> {100 * cal.after[name].ece:.1f}%"

    sets = ", ".join(s for s in (ece(cal.fitted_on), ece("test")) if s)
    log.info("Calibration: temperature %.3f from %d %s predictions; expected calibration error (15 bins, top-1) "
             "before -> after: %s", cal.temperature, cal.fitted_count, cal.fitted_on.replace("_", "-"), sets)
    u = ow.unknown
    if u is None:
        return
    rate = "" if ow.test_unknown_rate is None else f"; known test images called unknown: {100 * ow.test_unknown_rate:.1f}%"
    if np.isfinite(u.threshold):
        log.info("Unknown score (Mahalanobis distance to the nearest class): threshold %.4f (%s)%s",
                 u.threshold, u.rule, rate)
    else:
        log.warning("Unknown score: no held-out images to choose a threshold from, so no image is called unknown; "
                    "pass --unknown_threshold to set one")
    if u.loco_auroc:
        values = [v for v in u.loco_auroc.values() if np.isfinite(v)]
        per = ", ".join(f"{printable(k)} {100 * v:.1f}%" for k, v in u.loco_auroc.items())
        log.info("Leave-one-class-out AUROC of the unknown score: mean %.1f%% (%s)", 100 * np.mean(values), per)


def held_out_inputs(train, validation, head, *, cross=None, seed: int = 0) -> dict:
    """``fit_open_world`` keywords for the labelled rows: ``train`` + ``validation`` splits, in that order.

    ``cross`` is the run's :class:`~retrain.crossfit.CrossFit` over those rows, to pass only when the
    final layer was fitted the way its folds were (same steps, every labelled row): then every row's
    out-of-fold logits choose the temperature. Otherwise the temperature comes from ``head``'s
    logits on the validation split, the only rows it did not see. The unknown statistics need no
    layer, so their out-of-fold threshold always uses every labelled row: the cross-fit's folds, or
    folds made the same way (stratified, copies of an image kept together).
    """
    from retrain.crossfit import DEFAULT_FOLDS, assign_folds

    X = np.concatenate([train.X, validation.X])
    y = np.concatenate([train.y, validation.y]).astype(np.int64)
    if cross is not None:
        if len(cross.fold) != len(y):
            raise ValueError(f"the cross-fit has {len(cross.fold)} rows for {len(y)} training + validation rows")
        return dict(X_fit=X, y_fit=y, held_out_logits=cross.logits, held_out_rows=np.arange(len(y)),
                    fold=cross.fold, held_out_name="out_of_fold")
    groups = list(train.keys) + list(validation.keys)
    k = min(DEFAULT_FOLDS, len(set(groups)))
    fold = assign_folds(y, k, groups=groups, seed=seed) if k >= 2 else np.full(len(y), -1)
    logits = np.asarray(validation.X, np.float32) @ head.coef_ + head.intercept_
    return dict(X_fit=X, y_fit=y, held_out_logits=logits, held_out_rows=np.arange(len(train.y), len(y)),
                fold=fold, held_out_name="validation")
