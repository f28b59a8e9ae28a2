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
from retrain.openset import DEFAULT_ACCEPT, UnknownModel, energy, fit_unknown, loco_rows

log = logging.getLogger("retrain")

CALIBRATION_CHOICES = ("temperature", "none")
# The leave-one-class-out layers train for at most this many steps: the estimate's mean over the five photo
# sets moved by 0.2 points between 200 and 500 steps (digits, the largest, by 1.1: a slight underestimate),
# and by under one between 450 and 4,000 (docs/openworld.md); each step costs the same for every set.
LOCO_MAX_STEPS = 200


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
    temperature_from: tuple[np.ndarray, np.ndarray, str] | None = None,
    coef: np.ndarray,
    intercept: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    calibration: str = "temperature",
    unknown_threshold: float | None = None,
    head_params: dict | None = None,
    seed: int = 0,
    test_layer: tuple[np.ndarray, np.ndarray] | None = None,
    solved_c: float | None = None,
    balanced: bool = False,
) -> OpenWorld:
    """Temperature and unknown score for a layer ``coef`` (D, C), ``intercept`` (C,).

    ``X_fit`` (N, D), ``y_fit`` (N,): the labelled rows, all of which the unknown statistics use.
    ``held_out_logits`` (M, C) are predictions for rows ``held_out_rows`` (M,) of them by layers
    that did not see those rows; ``fold`` (N,) says which held-out fold each row is in (-1: none),
    for the out-of-fold unknown scores. ``held_out_name``: "out_of_fold" or "validation".
    ``temperature_from`` = (logits, row indices, name) picks the temperature from other held-out
    predictions (those of the final layer itself, when the cross-fit's layers differ from it).
    ``head_params`` (:class:`SoftmaxHead` keywords) refit the layer once per left-out class, all in one
    batched loop, for the energy term of the leave-one-class-out estimate (without: Mahalanobis alone).
    ``test_layer`` = (coef, intercept) of the layer that never saw the test rows, when ``coef`` did
    (``--final_fit all``): the test figures (ECE, known images called unknown) are that layer's.
    ``solved_c``: the final layer is the L-BFGS one at this scikit-learn C (``balanced``: class-weighted);
    the leave-one-class-out layers are then solved the same way, warm-started from the tested layer,
    instead of stepped with ``head_params``.
    """
    if calibration not in CALIBRATION_CHOICES:
        raise ValueError(f"calibration must be one of {CALIBRATION_CHOICES}, got {calibration!r}")
    t0 = time.perf_counter()
    y_fit = np.asarray(y_fit, np.int64)
    test_coef, test_intercept = test_layer or (coef, intercept)
    test_logits = np.asarray(X_test, np.float32) @ test_coef + test_intercept  # (T, C)
    t_logits, t_rows, t_name = temperature_from or (held_out_logits, held_out_rows, held_out_name)
    cal = calibrate(
        t_logits,
        y_fit[t_rows],
        fitted_on=t_name,
        measure={"test": (test_logits, y_test)},
        enabled=calibration == "temperature",
    )
    t = cal.temperature
    refit = None
    if solved_c is not None:
        refit = _solved_refits(len(labels), solved_c, balanced, (test_coef, test_intercept))
    elif head_params:
        refit = _stepped_refits(len(labels), head_params, seed)
    loco_energy = _loco_energy(X_fit, y_fit, X_test, y_test, len(labels), t, refit) if refit else None
    unknown = fit_unknown(
        X_fit,
        y_fit,
        fold,
        labels=labels,
        held_out_logits=held_out_logits / t,
        held_out_rows=held_out_rows,
        X_test=X_test,
        y_test=y_test,
        loco_energy=loco_energy,
        threshold=unknown_threshold,
        accept=DEFAULT_ACCEPT,
    )
    rate = None
    if len(y_test):
        rate = float((unknown.score(X_test, test_logits / t) > unknown.threshold).mean())
    result = OpenWorld(cal, unknown, rate, time.perf_counter() - t0)
    _log(result, labels)
    return result


def _loco_jobs(y_fit, y_test, n_classes: int):
    """(classes, rows per class as ``openset.loco_rows``, jobs (fit rows, scored rows)) over the rows of
    ``concatenate([X_fit, X_test])``: class c's layer fits every other class's fitted rows."""
    n_fit = len(y_fit)
    classes = [c for c in range(n_classes) if (y_fit != c).any() and (y_test != c).any()]
    rows = {c: loco_rows(y_fit, np.asarray(y_test), c) for c in classes}
    jobs = [
        (np.flatnonzero(y_fit != c), np.concatenate([n_fit + rows[c][0], rows[c][1], n_fit + rows[c][2]]))
        for c in classes
    ]
    return classes, rows, jobs


def _loco_energies(classes, rows, scored, temperature: float) -> dict:
    """``c -> (known, unknown)`` energies from class c's layer's logits; its own column, never a target
    there, is left out."""
    out = {}
    for c, logits in zip(classes, scored):
        e = energy(np.delete(logits, c, axis=1) / temperature)
        out[c] = (e[: len(rows[c][0])], e[len(rows[c][0]) :])
    return out


def _loco_energy(X_fit, y_fit, X_test, y_test, n_classes: int, temperature: float, refit):
    """``c -> (known, unknown)`` energies from layers fitted without class c (rows as ``openset.loco_rows``).

    ``refit(X, y, classes, jobs)`` fits one layer per left-out class on its job's rows and returns each one's
    logits on the job's scored rows (:func:`_stepped_refits`, :func:`_solved_refits`); class c's output column,
    never a target there, is left out of its energy.
    """
    if not len(y_test):
        return None
    classes, rows, jobs = _loco_jobs(y_fit, y_test, n_classes)
    if not jobs:
        return None
    X = np.concatenate([X_fit, X_test]).astype(np.float32)
    y = np.concatenate([y_fit, y_test]).astype(np.int64)
    out = _loco_energies(classes, rows, refit(X, y, classes, jobs), temperature)
    return lambda k: out.get(k, (None, None))


def _stepped_refits(n_classes: int, head_params: dict, seed: int):
    """Step-trained left-out layers: one :func:`retrain.crossfit.fit_and_score_many` loop for every class, at
    most ``LOCO_MAX_STEPS`` steps, scored once at the end (scoring 20 checkpoints cost a fifth more)."""
    from retrain.crossfit import fit_and_score_many

    steps = min(int(head_params.get("steps", LOCO_MAX_STEPS)), LOCO_MAX_STEPS)

    def refit(X, y, classes, jobs):
        seeded = [(fit, scored, seed + 7 * (c + 1)) for c, (fit, scored) in zip(classes, jobs)]
        params = {**head_params, "steps": steps}
        _, scored = fit_and_score_many(
            X, y, seeded, n_classes=n_classes, head_params=params, score_at=[steps]
        )
        return [logits[-1] for logits in scored]

    return refit


def _solved_refits(n_classes: int, c: float, balanced: bool, layer):
    """L-BFGS left-out layers, as the exported one: solved at the run's C (:func:`retrain.crossfit.
    solve_and_score_chains`), each warm-started from ``layer`` = (coef, intercept), the layer that never saw
    the test rows (so no scored row reaches a start), its class-c column set aside."""
    from retrain.crossfit import solve_and_score_chains

    def refit(X, y, classes, jobs):
        chains = solve_and_score_chains(
            X,
            y,
            [[job] for job in jobs],
            n_classes=n_classes,
            c=c,
            balanced=balanced,
            inits=[layer] * len(jobs),
        )
        return [chain[0] for chain in chains]

    return refit


def _log(ow: OpenWorld, labels: list[str]) -> None:
    cal = ow.calibration

    def ece(name: str) -> str:
        if name not in cal.before:
            return ""
        return (
            f"{name.replace('_', '-')} {100 * cal.before[name].ece:.1f}% -> {100 * cal.after[name].ece:.1f}%"
        )

    sets = ", ".join(s for s in (ece(cal.fitted_on), ece("test")) if s)
    log.info(
        "Calibration: temperature %.3f from %d %s predictions; expected calibration error (15 bins, top-1) "
        "before -> after: %s",
        cal.temperature,
        cal.fitted_count,
        cal.fitted_on.replace("_", "-"),
        sets,
    )
    u = ow.unknown
    if u is None:
        return
    rate = (
        ""
        if ow.test_unknown_rate is None
        else f"; known test images called unknown: {100 * ow.test_unknown_rate:.1f}%"
    )
    if np.isfinite(u.threshold):
        log.info(
            "Unknown score (Mahalanobis distance to the nearest class + energy): threshold %.4f (%s)%s",
            u.threshold,
            u.rule,
            rate,
        )
    else:
        log.warning(
            "Unknown score: no held-out images to choose a threshold from, so no image is called unknown; "
            "pass --unknown_threshold to set one"
        )
    if u.loco_auroc:
        values = [v for v in u.loco_auroc.values() if np.isfinite(v)]
        per = ", ".join(f"{printable(k)} {100 * v:.1f}%" for k, v in u.loco_auroc.items())
        log.info(
            "Leave-one-class-out AUROC of the unknown score: mean %.1f%% (%s)", 100 * np.mean(values), per
        )


def held_out_inputs(
    train, validation, head, *, cross=None, head_like_folds: bool = False, seed: int = 0
) -> dict:
    """``fit_open_world`` keywords for the labelled rows: ``train`` + ``validation`` splits, in that order.

    ``cross`` is the run's :class:`~retrain.crossfit.CrossFit` over those rows: its out-of-fold logits
    and folds give the unknown score's held-out statistics and threshold on every row. The temperature
    comes from them too when ``head_like_folds`` (the final layer was fitted as the folds were: same
    steps, every labelled row); otherwise from ``head``'s own logits on the validation split, the
    only rows it did not see -- a temperature must match the layer it scales. Without ``cross``,
    the validation split is the held-out part for both (folds for the Mahalanobis term are made
    as the cross-fit makes them: stratified, copies of an image together).
    """
    from retrain.crossfit import DEFAULT_FOLDS, assign_folds

    X = np.concatenate([train.X, validation.X])
    y = np.concatenate([train.y, validation.y]).astype(np.int64)
    val_rows = np.arange(len(train.y), len(y))
    val_logits = np.asarray(validation.X, np.float32) @ head.coef_ + head.intercept_
    if cross is not None:
        if len(cross.fold) != len(y):
            raise ValueError(
                f"the cross-fit has {len(cross.fold)} rows for {len(y)} training + validation rows"
            )
        own = None if head_like_folds or not len(val_rows) else (val_logits, val_rows, "validation")
        return dict(
            X_fit=X,
            y_fit=y,
            held_out_logits=cross.logits,
            held_out_rows=np.arange(len(y)),
            fold=cross.fold,
            held_out_name="out_of_fold",
            temperature_from=own,
        )
    groups = list(train.keys) + list(validation.keys)
    k = min(DEFAULT_FOLDS, len(set(groups)))
    fold = assign_folds(y, k, groups=groups, seed=seed) if k >= 2 else np.full(len(y), -1)
    return dict(
        X_fit=X,
        y_fit=y,
        held_out_logits=val_logits,
        held_out_rows=val_rows,
        fold=fold,
        held_out_name="validation",
    )
