"""``report.html`` of a multi-label run (``metrics.json`` with ``"kind": "multi_label"``).

Built, like the single-label page (:mod:`retrain.report`), only from files the run left in its
folder: ``metrics.json`` (the figures), ``multilabel.npz`` (per-image truth and probabilities of
the held-out and test images, for the counts, the intervals and the galleries) and ``config.json``
(the image folder, to show shorter names). The page has the same inline-only CSS, Content-Security-
Policy and escaping: every file name and label goes through :func:`html.escape`, and its one small
script only filters cards by a ``data-`` attribute it reads as text.

Instead of the confusion matrix it shows a per-label table (average precision, precision and recall
with Wilson intervals, F1, support, threshold) and galleries of the test images' missed and
spurious labels. Sections that need single-label data say they are not available yet.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retrain.audit import wilson_interval
from retrain.cache import atomic_write_bytes
from retrain.data import SPLITS, TESTING, TRAINING, VALIDATION, printable
from retrain.errors import RetrainError
from retrain.report import RowImages  # report.py imports this module only inside write_report

NPZ_FILE = "multilabel.npz"  # retrain.multilabel.NPZ_FILE
MAX_GALLERY = 60  # test images shown per gallery (the rest are counted)
WEAK_AP = 0.7  # a label below this test AP gets a tip
_SOURCES = {
    "tuned": "tuned: best example F1 on held-out images, pulled toward the shared threshold",
    "shared": "shared: too few held-out positives, the one threshold tuned for all labels together",
    "flag": "--multi_label_threshold",
    "default": "0.5: no held-out images to tune on",
}


def write_multilabel_report(run_dir: Path, metrics: dict) -> Path:
    """``report.html`` of a multi-label run in ``run_dir``; returns its path."""
    from retrain.report import REPORT_FILE, _read_json

    npz = load_npz(run_dir / NPZ_FILE)
    config = _read_json(run_dir / "config.json", required=False) or {}
    page = render_multilabel(run_dir, metrics, npz, config)
    path = run_dir / REPORT_FILE
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def load_npz(path: Path) -> dict | None:
    """``multilabel.npz`` as a dict (None when absent: the page then shows metrics.json's figures only)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("paths", "truth", "probs", "labels", "thresholds", "split")}
    except Exception as exc:  # noqa: BLE001 - np.load raises many types for a damaged file
        raise RetrainError(
            f"{printable(str(path))} is damaged ({type(exc).__name__}); train again."
        ) from None
    n, L = out["probs"].shape if out["probs"].ndim == 2 else (-1, -1)
    if (
        out["truth"].shape != (n, L)
        or len(out["paths"]) != n
        or len(out["split"]) != n
        or len(out["labels"]) != L
    ):
        raise RetrainError(f"{printable(str(path))} has arrays of different sizes; train again.")
    out["truth"] = out["truth"].astype(bool)
    out["paths"] = [str(p) for p in out["paths"]]
    out["labels"] = [str(x) for x in out["labels"]]
    out["split"] = out["split"].astype(str)
    return out


# -- the page -------------------------------------------------------------------------------------
def render_multilabel(run_dir: Path, metrics: dict, npz: dict | None, config: dict) -> str:
    from retrain.report import _CSS, _e, _script_json

    ctx = _MLContext(run_dir, metrics, npz, config)
    sections = [
        ("next", "What to do next", _next_steps(ctx)),
        ("data", "Data", _data_section(ctx)),
        ("training", "Training", _training_section(ctx)),
        ("test", "Test results", _test_section(ctx)),
        ("missed", "Missed labels", _gallery_section(ctx, missed=True)),
        ("spurious", "Spurious labels", _gallery_section(ctx, missed=False)),
        ("other", "Not available for multi-label runs yet", _not_yet()),
    ]
    ctx.make_thumbnails()
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections
    )
    where = f" · images from {_e(printable(ctx.image_dir))}" if ctx.image_dir else ""
    n_images = metrics.get("image_count", len(ctx.paths))
    data = _script_json({"thumbs": {str(i): uri for i, uri in ctx.thumbs.items()}})
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>retrain report: {_e(run_dir.name)}</title><style>{_CSS}{_ML_CSS}</style></head>"
        "<body class=multi-label>"
        f"<header><h1>retrain report <span class=kind>multi-label</span></h1><p class='sub'>"
        f"{_e(printable(str(run_dir)))}{where} · {len(ctx.labels)} labels · {_e(n_images)} images</p>"
        f"<p class='headline' id=headline>{_headline(ctx.test)}</p><nav>{nav}</nav></header>"
        f"<main>{body}</main>"
        f"<script type='application/json' id='report-data'>{data}</script><script>{_ML_JS}</script>"
        "</body></html>"
    )


def _headline(test: dict | None) -> str:
    from retrain.report import _e

    if not test or not test.get("n_images"):
        return "Test mAP <b>not measured</b> (no test images)"
    return (
        f"Test mAP <b>{_pct(test.get('mAP'))}</b> · example F1 <b>{_pct(test.get('example_f1'))}</b> "
        f"<span class=ci>(at 0.5: {_pct(test.get('example_f1_at_0.5'))})</span> · exact match "
        f"<b>{_pct(test.get('exact_match'))}</b> <span class=ci>(N={_e(test['n_images'])})</span>"
    )


class _MLContext(RowImages):
    """metrics.json's figures plus the per-image arrays of multilabel.npz, and the thumbnails to embed."""

    def __init__(self, run_dir: Path, metrics: dict, npz: dict | None, config: dict):
        super().__init__()
        self.run_dir, self.metrics, self.npz = run_dir, metrics, npz
        parts = metrics.get("multi_label") or {}
        self.test, self.validation = parts.get("test"), parts.get("validation")
        labels = metrics.get("labels") or (npz["labels"] if npz else None)
        if not labels:
            per_label = (self.test or self.validation or {}).get("per_label") or {}
            labels = list(per_label)
        self.labels: list[str] = [str(x) for x in labels]
        if npz is not None and npz["labels"] != self.labels:
            raise RetrainError(
                f"{printable(str(run_dir / NPZ_FILE))} and metrics.json name different labels; train again."
            )
        self.paths = npz["paths"] if npz else []
        self.truth = npz["truth"] if npz else np.zeros((0, len(self.labels)), bool)
        self.probs = npz["probs"] if npz else np.zeros((0, len(self.labels)), np.float32)
        self.split = npz["split"] if npz else np.zeros(0, str)
        thresholds = metrics.get("thresholds") or (npz["thresholds"] if npz else [0.5] * len(self.labels))
        self.thresholds = np.asarray(thresholds, np.float32).reshape(-1)
        self.pred = self.probs >= self.thresholds[None, :] if len(self.probs) else self.truth.copy()
        image_dir = str(config.get("image_dir") or "")
        if not image_dir and self.paths:
            try:
                image_dir = os.path.commonpath(self.paths)
            except ValueError:  # paths on different drives
                image_dir = ""
        self.image_dir = image_dir if image_dir and image_dir != os.sep else ""

    def rows_of(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


# -- sections --------------------------------------------------------------------------------------------
def _data_section(ctx: _MLContext) -> str:
    from retrain.report import _e

    m = ctx.metrics
    facts = [
        ("images (distinct photos)", m.get("image_count")),
        ("copies folded into one photo (the same photo in several label folders)", m.get("copies_merged")),
        ("training images", m.get("train_count")),
        ("test images", m.get("test_count")),
        ("skipped files", m.get("skipped_files")),
    ]
    out = (
        "<table>"
        + "".join(f"<tr><td>{_e(k)}</td><td class=n>{_e(v)}</td></tr>" for k, v in facts if v is not None)
        + "</table>"
    )
    if ctx.npz is None:
        return out + f"<p>{NPZ_FILE} is missing: no counts per label.</p>"
    shown = [s for s in SPLITS if (ctx.split == s).any()]
    counts = np.array(
        [[int(ctx.truth[ctx.split == s, j].sum()) for s in shown] for j in range(len(ctx.labels))]
    )
    counts = counts.reshape(len(ctx.labels), len(shown))
    rows = "".join(
        f"<tr><td>{_e(label)}</td>{''.join(f'<td class=n>{v}</td>' for v in counts[j])}"
        f"<td class=n>{counts[j].sum()}</td></tr>"
        for j, label in enumerate(ctx.labels)
    )
    per_split = [int((ctx.split == s).sum()) for s in shown]
    totals = "".join(f"<td class=n><b>{v}</b></td>" for v in [*per_split, len(ctx.split)])
    head = "".join(f"<th>{_e(s)}</th>" for s in shown)
    n_all = m.get("image_count")
    note = ""
    if n_all is not None and len(ctx.split) < n_all:
        note = (
            f"<p class=hint>Counted over the {len(ctx.split)} of {_e(n_all)} images that have held-out or test "
            f"probabilities in {NPZ_FILE} (without a cross-fit the training images have none).</p>"
        )
    out += (
        "<h3>Images per label</h3><p class=hint>A photo with several labels counts once under each of them; "
        "the last row counts photos.</p>"
        f"<table id=label-counts><tr><th>label</th>{head}<th>all</th></tr>{rows}"
        f"<tr><td><b>photos</b></td>{totals}</tr></table>{note}"
    )
    per_label = counts.sum(axis=1)
    if len(per_label) and per_label.min() >= 0:
        ratio = per_label.max() / max(per_label.min(), 1)
        out += (
            f"<p>Most common label / least common: <b>{ratio:.1f}x</b> ({per_label.max()} vs {per_label.min()} "
            "images).</p>"
        )
    sizes = ctx.truth.sum(axis=1)
    top = int(sizes.max()) if len(sizes) else 0
    size_rows = "".join(
        f"<tr><td class=n>{k}</td>"
        + "".join(f"<td class=n>{int(((sizes == k) & (ctx.split == s)).sum())}</td>" for s in shown)
        + f"<td class=n>{int((sizes == k).sum())}</td></tr>"
        for k in range(top + 1)
        if (sizes == k).any() or k >= 1
    )
    out += (
        "<h3>Labels per photo</h3>"
        f"<table id=label-set-sizes><tr><th>labels</th>{head}<th>all</th></tr>{size_rows}</table>"
        f"<p>On average <b>{float(sizes.mean()) if len(sizes) else 0:.2f}</b> labels per photo.</p>"
    )
    return out


def _training_section(ctx: _MLContext) -> str:
    from retrain.report import _e, _line_chart

    m, out = ctx.metrics, ""
    cf = m.get("crossfit")
    if cf and cf.get("curve_steps"):
        out += (
            "<div class=charts>"
            + _line_chart(
                "out-of-fold mAP by training steps",
                cf["curve_steps"],
                [("out-of-fold mAP", cf.get("curve_map") or [], "#f58518")],
                y_range=(0, 1),
                percent=True,
            )
            + "</div>"
        )
    if cf:
        out += (
            f"<p>Cross-fit on training + validation ({_e(cf.get('folds'))} folds, each image scored by a layer "
            f"that never saw it): out-of-fold mAP <b>{_pct(cf.get('mAP'))}</b> at {_e(cf.get('best_steps'))} "
            "steps, the number the final layer trained for.</p>"
        )
    elif m.get("best_step"):
        out += f"<p>Kept the weights of step {_e(m['best_step'])} (best validation mAP).</p>"
    if m.get("final_fit"):
        out += f"<p>Final layer fitted on: <code>{_e(m['final_fit'])}</code> ({_e(m.get('final_fit_count'))} images).</p>"
    v = ctx.validation
    if v and v.get("n_images"):
        kind = (
            "Out-of-fold (training + validation)"
            if m.get("validation_kind") == "out-of-fold"
            else "Validation"
        )
        out += (
            f"<p>{_e(kind)}: mAP {_pct(v.get('mAP'))}, example F1 {_pct(v.get('example_f1'))} (at 0.5: "
            f"{_pct(v.get('example_f1_at_0.5'))}), exact match {_pct(v.get('exact_match'))} "
            f"(N={_e(v['n_images'])}). The thresholds were tuned on these images.</p>"
        )
    sources = m.get("threshold_source") or {}
    if sources:
        by: dict[str, list[str]] = {}
        for label, s in sources.items():
            by.setdefault(str(s), []).append(label)
        items = "".join(
            f"<li>{_e(_SOURCES.get(s, s))}: {len(names)} label(s)"
            + (
                f" ({', '.join(_e(n) for n in names[:12])}{', …' if len(names) > 12 else ''})"
                if s != "tuned"
                else ""
            )
            + "</li>"
            for s, names in by.items()
        )
        out += f"<h3>Decision thresholds</h3><ul>{items}</ul>"
    return out or "<p>No training curve was recorded.</p>"


def _counts(ctx: _MLContext) -> dict[str, tuple[int, int, int]] | None:
    """label -> (true positives, predicted, true) on the test images of multilabel.npz."""
    if ctx.npz is None:
        return None
    te = ctx.rows_of(TESTING)
    if not len(te):
        return None
    t, p = ctx.truth[te], ctx.pred[te]
    return {
        label: (int((t[:, j] & p[:, j]).sum()), int(p[:, j].sum()), int(t[:, j].sum()))
        for j, label in enumerate(ctx.labels)
    }


def _test_section(ctx: _MLContext) -> str:
    from retrain.report import _e

    test = ctx.test
    if not test or not test.get("n_images"):
        return (
            "<p>No test images: the test figures are not measured (too few images, or "
            "<code>--testing_percentage</code> is 0).</p>"
        )
    n = int(test["n_images"])
    exact = test.get("exact_match")
    exact_ci = ""
    if exact is not None:
        lo, hi = wilson_interval(int(round(exact * n)), n)
        exact_ci = f" <span class=ci>(95% CI {100 * lo:.0f}–{100 * hi:.0f}%)</span>"
    f1, f1_half = test.get("example_f1"), test.get("example_f1_at_0.5")
    gain = ""
    if f1 is not None and f1_half is not None:
        gain = f" (tuned thresholds vs 0.5: {100 * (f1 - f1_half):+.1f} points)"
    out = (
        "<table class=facts>"
        f"<tr><td>mAP (mean over labels of average precision)</td><td class=n><b>{_pct(test.get('mAP'))}</b></td></tr>"
        f"<tr><td>example F1 at the tuned thresholds</td><td class=n><b>{_pct(f1)}</b></td></tr>"
        f"<tr><td>example F1 at 0.5, for comparison</td><td class=n>{_pct(f1_half)}</td></tr>"
        f"<tr><td>exact match (every label of the photo right)</td><td class=n>{_pct(exact)}{exact_ci}</td></tr>"
        f"<tr><td>test images</td><td class=n>{n}</td></tr></table>"
        f"<p class=hint>Example F1: per photo, the F1 of its chosen labels against its true ones, averaged{gain}. "
        "Average precision does not depend on the threshold; precision, recall and F1 do. Intervals are "
        "Wilson's 95%.</p>"
    )
    counts = _counts(ctx)
    per_label = test.get("per_label") or {}
    sources = ctx.metrics.get("threshold_source") or {}
    rows = ""
    for j, label in enumerate(ctx.labels):
        s = per_label.get(label) or {}
        c = counts.get(label) if counts else None
        precision = _pct_ci(s.get("precision"), c and c[1] and wilson_interval(c[0], c[1]))
        recall = _pct_ci(s.get("recall"), c and c[2] and wilson_interval(c[0], c[2]))
        ap = s.get("ap")
        bar = f'<span class=apbar style="--w:{100 * ap:.0f}%"></span>' if ap is not None else ""
        threshold = s.get("threshold", float(ctx.thresholds[j]) if j < len(ctx.thresholds) else None)
        star = "*" if sources.get(label) not in (None, "tuned") else ""
        weak = " class=weak" if ap is not None and ap < WEAK_AP else ""
        rows += (
            f"<tr{weak} data-label='{_e(label)}'><td>{_e(label)}</td><td class=n>{_e(s.get('support', '–'))}</td>"
            f"<td class='n ap'>{bar}{_pct(ap)}</td><td class=n>{precision}</td><td class=n>{recall}</td>"
            f"<td class=n>{_pct(s.get('f1'))}</td>"
            f"<td class=n>{'–' if threshold is None else f'{threshold:.2f}'}{star}</td></tr>"
        )
    out += (
        "<h3>Per label</h3><table id=per-label><tr><th>label</th><th>support</th><th>AP</th>"
        "<th>precision (95% CI)</th><th>recall (95% CI)</th><th>F1</th><th>threshold</th></tr>"
        f"{rows}</table>"
    )
    if any(v not in ("tuned",) for v in sources.values()):
        out += "<p class=hint>* not tuned for this label alone (see <a href='#training'>thresholds</a>).</p>"
    out += (
        "<p class=hint>Support: test photos that carry the label. “–”: not measurable (no test photo has the "
        "label, or none was given it). Labels below "
        f"{100 * WEAK_AP:.0f}% AP are highlighted.</p>"
    )
    return out


def _gallery_section(ctx: _MLContext, *, missed: bool) -> str:
    from retrain.report import _e

    what = "missed" if missed else "spurious"
    if ctx.npz is None:
        return f"<p>{NPZ_FILE} is missing: no gallery.</p>"
    te = ctx.rows_of(TESTING)
    if not len(te):
        return "<p>No test images.</p>"
    wrong = (ctx.truth & ~ctx.pred) if missed else (ctx.pred & ~ctx.truth)
    rows = [int(i) for i in te if wrong[i].any()]
    n_wrong = int(wrong[te].sum())
    if not rows:
        return (
            f"<p>None: every label of every test photo was {'found' if missed else 'right'} "
            f"({len(te)} test photos).</p>"
        )
    # Most confident mistakes first: a missed label with the lowest probability, a spurious one with the highest.
    worst = np.where(wrong, ctx.probs, np.inf if missed else -np.inf)
    rows.sort(key=lambda i: float(worst[i].min()) if missed else -float(worst[i].max()))
    per_label = wrong[te].sum(axis=0)
    options = "".join(
        f"<option value='{_e(label)}'>{_e(label)} ({int(per_label[j])})</option>"
        for j, label in enumerate(ctx.labels)
        if per_label[j]
    )
    cards = "".join(_card(ctx, i, wrong[i], missed) for i in rows[:MAX_GALLERY])
    more = f"<p>… and {len(rows) - MAX_GALLERY} more photos.</p>" if len(rows) > MAX_GALLERY else ""
    intro = (
        "Test photos with a true label the model did not choose (its probability below the label's threshold), "
        "lowest probability first."
        if missed
        else "Test photos given a label they do not carry (its probability at or above the threshold), "
        "highest probability first."
    )
    return (
        f"<p>{intro} <b>{n_wrong}</b> {what} label(s) on <b>{len(rows)}</b> of {len(te)} test photos.</p>"
        "<p class=hint>Chips: <span class='chip ok'>right</span> <span class='chip miss'>missed</span> "
        "<span class='chip extra'>spurious</span>, each with its probability.</p>"
        f"<label class=filter>Show label <select class=ml-filter data-gallery='{what}'>"
        f"<option value=''>all</option>{options}</select></label>"
        f"<div class=gallery id='{what}-gallery'>{cards}</div>{more}"
    )


def _card(ctx: _MLContext, i: int, wrong: np.ndarray, missed: bool) -> str:
    from retrain.report import _e

    def chip(j: int, cls: str) -> str:
        return (
            f"<span class='chip {cls}' title='{_e(ctx.labels[j])}: {100 * float(ctx.probs[i, j]):.0f}%, threshold "
            f"{100 * float(ctx.thresholds[j]):.0f}%'>{_e(ctx.labels[j])} {100 * float(ctx.probs[i, j]):.0f}%</span>"
        )

    bad = [int(j) for j in np.flatnonzero(wrong)]
    truth = [int(j) for j in np.flatnonzero(ctx.truth[i])]
    chosen = [int(j) for j in np.argsort(-ctx.probs[i], kind="stable") if ctx.pred[i, j]]
    key = "missed" if missed else "spurious"
    lines = "".join(
        f"<span class=line><b>{key}</b> {_e(ctx.labels[j])}: {100 * float(ctx.probs[i, j]):.0f}% "
        f"<span class=ci>(threshold {100 * float(ctx.thresholds[j]):.0f}%)</span></span>"
        for j in bad
    )
    true_chips = "".join(chip(j, "ok" if ctx.pred[i, j] else "miss") for j in truth) or "<i>none</i>"
    chosen_chips = "".join(chip(j, "ok" if ctx.truth[i, j] else "extra") for j in chosen) or "<i>none</i>"
    wrong_attr = _e("\t".join(ctx.labels[j] for j in bad))  # the gallery's filter splits it on tabs
    return (
        f"<figure class='card ml' data-row='{i}' data-wrong='{wrong_attr}'>{ctx.thumb(i)}<figcaption>"
        f"<span class=name>{_e(ctx.rel(i))}</span>{lines}"
        f"<span class=sets>true: {true_chips}</span><span class=sets>chosen: {chosen_chips}</span>"
        "</figcaption></figure>"
    )


def _not_yet() -> str:
    return (
        "<p>The confusion matrix, confidence calibration, suspected label errors, duplicates and leakage, the "
        "learning curve and the open-world (unknown) score need single-label data: they are not available "
        "for multi-label runs yet.</p>"
    )


def _next_steps(ctx: _MLContext) -> str:
    from retrain.report import _e

    tips = []
    test, m = ctx.test, ctx.metrics
    if not test or not test.get("n_images"):
        tips.append(
            "There are no test images, so nothing on this page says how well the model does on new photos: "
            "add photos or raise <code>--testing_percentage</code>."
        )
    else:
        per_label = test.get("per_label") or {}
        train_counts = {}
        if ctx.npz is not None:
            tr = np.isin(ctx.split, (TRAINING, VALIDATION))
            train_counts = {label: int(ctx.truth[tr, j].sum()) for j, label in enumerate(ctx.labels)}
        weak = sorted(
            (s["ap"], label)
            for label, s in per_label.items()
            if s.get("ap") is not None and s["ap"] < WEAK_AP
        )
        for ap, label in weak[:5]:
            have = f"{train_counts[label]} training + validation photos, " if label in train_counts else ""
            tips.append(
                f"label <b>{_e(label)}</b>: {have}test AP {100 * ap:.0f}%. Add photos that carry it (and photos "
                "that look alike but do not), and check its <a href='#missed'>missed</a> and "
                "<a href='#spurious'>spurious</a> photos."
            )
        f1s = [(s["f1"], label) for label, s in per_label.items() if s.get("f1") is not None]
        if not weak and f1s and min(f1s)[0] < 0.9:
            f1, label = min(f1s)
            tips.append(
                f"The weakest label is <b>{_e(label)}</b> (test F1 {100 * f1:.0f}%): its "
                "<a href='#missed'>missed</a> and <a href='#spurious'>spurious</a> photos show what it confuses."
            )
        if len(weak) > 5:
            tips.append(f"… and {len(weak) - 5} more label(s) below {100 * WEAK_AP:.0f}% AP (see the table).")
        absent = [label for label, s in per_label.items() if not s.get("support")]
        if absent:
            tips.append(
                f"{len(absent)} label(s) have no test photo ({', '.join(_e(x) for x in absent[:8])}"
                f"{', …' if len(absent) > 8 else ''}): their figures are not measured."
            )
        f1, f1_half = test.get("example_f1"), test.get("example_f1_at_0.5")
        if f1 is not None and f1_half is not None and f1 + 0.005 < f1_half:
            tips.append(
                f"The tuned thresholds did worse on the test photos than 0.5 (example F1 {100 * f1:.1f}% vs "
                f"{100 * f1_half:.1f}%): with few held-out positives, try <code>--multi_label_threshold 0.5</code>."
            )
        n = int(test["n_images"])
        if n and test.get("exact_match") is not None:
            lo, hi = wilson_interval(int(round(test["exact_match"] * n)), n)
            if hi - lo > 0.15:
                tips.append(
                    f"The test set is small (N={n}): the true exact-match ratio lies anywhere in "
                    f"{100 * lo:.0f}–{100 * hi:.0f}%."
                )
    if m.get("skipped_files"):
        tips.append(f"{_e(m['skipped_files'])} file(s) could not be used (see the log).")
    if not tips:
        tips.append("Nothing stands out: every label has at least 70% test AP.")
    return "<ol class=tips>" + "".join(f"<li>{t}</li>" for t in tips) + "</ol>"


# -- small helpers -----------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def _pct_ci(value, ci) -> str:
    if value is None:
        return "–"
    if not ci:
        return _pct(value)
    return f"{_pct(value)} <span class=ci>({100 * ci[0]:.0f}–{100 * ci[1]:.0f})</span>"


_ML_CSS = """
.kind{font-size:13px;font-weight:500;background:#e7eefb;color:#2a5db0;border-radius:4px;padding:1px 6px;
vertical-align:middle}table.facts td:first-child{color:#444}tr.weak td{background:#fff4e5}
td.ap{position:relative;min-width:90px}.apbar{position:absolute;left:4px;top:50%;height:6px;margin-top:6px;
width:calc((100% - 8px) * var(--w) / 100%);max-width:calc(100% - 8px);background:#4c78a8;opacity:.35;
border-radius:3px}figure.card.ml{width:190px}.line{display:block;margin:2px 0}.sets{display:block;margin-top:3px;
font-size:11.5px;color:#555}.chip{display:inline-block;border-radius:3px;padding:0 4px;margin:1px 2px 0 0;
font-size:11px;background:#e5f3e9;color:#185c2e}.chip.miss{background:#fde2df;color:#8c1d12}
.chip.extra{background:#fff1d6;color:#7a4a00}.filter{font-size:13px;color:#444}.filter select{margin-left:6px;width:auto}
"""

# Reads only the JSON block and data- attributes (as text); sets src, hidden: no HTML is parsed from data.
_ML_JS = """
(function(){
'use strict';
const D = JSON.parse(document.getElementById('report-data').textContent);
for (const img of document.querySelectorAll('img.th')) {
  const uri = D.thumbs[img.dataset.row];
  if (uri) img.src = uri;
}
for (const sel of document.querySelectorAll('select.ml-filter')) {
  sel.addEventListener('change', () => {
    const box = document.getElementById(sel.dataset.gallery + '-gallery');
    for (const card of box.querySelectorAll('figure.card')) {
      card.hidden = sel.value !== '' && !card.dataset.wrong.split('\\t').includes(sel.value);
    }
  });
}
document.body.dataset.ready = '1';
})();
"""
