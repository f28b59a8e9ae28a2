"""``report.html``: one self-contained page about a run, and ``retrain report RUN_DIR``.

The page is built only from files the run left in its folder (``metrics.json``, ``audit.npz``,
``fine_tune.json`` when fine-tuned) plus small JPEG thumbnails of the images it shows, so it can
be rebuilt at any time without retraining. Everything is inline (CSS, JS, SVG, ``data:`` images)
and a Content-Security-Policy forbids every request: the page opens from disk, offline, and
never loads anything. Every file name and label is escaped (HTML text via :func:`html.escape`,
data for the script as JSON with ``<``, ``>`` and ``&`` escaped, and the script only ever sets
``textContent``), so a file called ``<script>….jpg`` shows as text.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retrain.audit import wilson_interval
from retrain.cache import atomic_write_bytes
from retrain.data import SPLITS, TESTING, printable
from retrain.devices import cpu_cores
from retrain.errors import RetrainError
from retrain.runaudit import AUDIT_FILE, SUSPECT_SCORE, load_audit

REPORT_FILE = "report.html"
THUMB_PX = 112
MAX_PER_CELL = 40  # thumbnails per confusion-matrix cell (the rest are listed by name)
MAX_GALLERY = 120  # misclassified test images shown
MAX_SUSPECTS = 60  # suspected label errors shown with thumbnails
MAX_PAIRS = 60  # duplicate pairs shown with thumbnails
FEW_IMAGES = 100  # the tutorial's advice: at least a hundred photos per class


def write_report(run_dir: str | os.PathLike) -> Path:
    """Build ``report.html`` in ``run_dir`` from the files the run saved there; returns its path."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json", required=True)
    if metrics.get("kind") == "multi_label":  # its own page: per-label table, missed and spurious labels
        from retrain.report_multilabel import write_multilabel_report

        return write_multilabel_report(run_dir, metrics)
    audit = load_audit(run_dir / AUDIT_FILE)
    fine_tune = _read_json(run_dir / "fine_tune.json", required=False)
    page = render(run_dir, metrics, audit, fine_tune)
    path = run_dir / REPORT_FILE
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _read_json(path: Path, *, required: bool) -> dict | None:
    if not path.exists():
        if required:
            raise RetrainError(
                f"{printable(str(path))} does not exist: give the folder of a finished run "
                "(e.g. retrain_runs/latest)."
            )
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RetrainError(f"cannot read {printable(str(path))}: {exc}") from None


# -- the page -------------------------------------------------------------------------------------
def render(run_dir: Path, metrics: dict, audit: dict, fine_tune: dict | None) -> str:
    """The whole page as a string."""
    ctx = _Context(run_dir, metrics, audit)
    sections = [
        ("next", "What to do next", _next_steps(ctx)),
        ("data", "Data", _data_section(ctx)),
        ("training", "Training", _training_section(ctx, fine_tune)),
        ("test", "Test results", _test_section(ctx)),
        ("calibration", "Confidence and calibration", _calibration_section(ctx)),
        ("labels", "Suspected label errors", _label_section(ctx)),
        ("duplicates", "Duplicates and leakage", _duplicate_section(ctx)),
        ("curve", "How many more photos?", _curve_section(ctx)),
    ]
    ctx.make_thumbnails()
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections
    )
    data = _script_json(ctx.script_data())
    test = metrics.get("test") or {}
    headline = _acc_text(test.get("correct"), test.get("count")) if test.get("count") else "not measured"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>retrain report: {_e(run_dir.name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>retrain report</h1><p class='sub'>{_e(printable(str(run_dir)))} · images from "
        f"{_e(printable(audit['image_dir']))} · {len(ctx.labels)} classes · {len(ctx.y)} images</p>"
        f"<p class='headline'>Test accuracy <b>{headline}</b></p><nav>{nav}</nav></header>"
        f"<main>{body}</main>"
        f"<script type='application/json' id='report-data'>{data}</script><script>{_JS}</script>"
        "</body></html>"
    )


class RowImages:
    """Rows of a run shown as images: their printable paths, and the thumbnails the page embeds (only of
    the rows it shows). Subclasses set ``paths`` and ``image_dir``; ``thumb`` marks a row as wanted and
    ``make_thumbnails`` reads the wanted images once, in parallel, at the end."""

    paths: list[str]
    image_dir: str

    def __init__(self) -> None:
        self.wanted: set[int] = set()
        self.thumbs: dict[int, str] = {}

    def rel(self, i: int) -> str:
        """A row's path relative to the image folder (shorter to read), printable."""
        path, root = self.paths[i], self.image_dir
        inside = root and path.startswith(root.rstrip(os.sep) + os.sep)
        return printable(os.path.relpath(path, root) if inside else path)

    def thumb(self, i: int) -> str:
        """An <img> placeholder filled from the embedded thumbnails by the script (or a blank box)."""
        self.wanted.add(int(i))
        return f'<img class="th" data-row="{int(i)}" alt="{_e(self.rel(i))}">'

    def make_thumbnails(self) -> None:
        rows = sorted(self.wanted)
        with ThreadPoolExecutor(max_workers=max(1, cpu_cores())) as pool:
            for i, uri in zip(rows, pool.map(lambda r: _thumbnail(self.paths[r]), rows)):
                if uri:
                    self.thumbs[i] = uri


class _Context(RowImages):
    """The run's arrays plus the set of images whose thumbnails the page embeds."""

    def __init__(self, run_dir: Path, metrics: dict, audit: dict):
        super().__init__()
        self.run_dir, self.metrics, self.a = run_dir, metrics, audit
        self.labels: list[str] = audit["labels"]
        self.paths = audit["paths"]
        self.image_dir = audit["image_dir"]
        self.y = audit["y"]
        self.split = audit["split"]
        self.proba = audit["proba"]
        self.pred = self.proba.argmax(axis=1) if len(self.proba) else np.zeros(0, np.int64)
        self.cells: dict[str, list[int]] = {}

    def script_data(self) -> dict:
        rows = sorted(set(self.wanted) | {i for cell in self.cells.values() for i in cell})
        issues = self.a["issue_order"]
        return {
            "labels": self.labels,
            "thumbs": {str(i): self.thumbs.get(i, "") for i in rows},
            "rows": {
                str(i): [self.rel(i), int(self.y[i]), int(self.pred[i]), round(float(self.proba[i].max()), 4)]
                for i in rows
            },
            "cells": self.cells,
            "issues": [
                [
                    printable(self.paths[i]),
                    self.labels[self.y[i]],
                    self.labels[self.a["issue_suggested"][i]],
                    round(float(self.a["issue_score"][i]), 4),
                    rank,
                    str(self.split[i]),
                ]
                for rank, i in enumerate(issues, start=1)
            ],
        }


def _thumbnail(path: str) -> str:
    """A small JPEG as a data: URI, or "" when the file is gone (e.g. moved by retrain relabel) or unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            # JPEG: decode at the smallest DCT scale still at least THUMB_PX (its scaling is an area filter, so
            # the thumbnail looks the same; 2.3x less CPU than decoding at twice that on 300 px photos).
            im.draft("RGB", (THUMB_PX, THUMB_PX))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=72)
    except Exception:  # noqa: BLE001 - any unreadable file just shows no thumbnail
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# -- sections --------------------------------------------------------------------------------------------
def _data_section(ctx: _Context) -> str:
    counts = np.zeros((len(ctx.labels), len(SPLITS)), dtype=np.int64)
    for c, s in zip(ctx.y, ctx.split):
        counts[c, SPLITS.index(str(s))] += 1
    rows = "".join(
        f"<tr><td>{_e(label)}</td>{''.join(f'<td class=n>{v}</td>' for v in counts[c])}"
        f"<td class=n>{counts[c].sum()}</td></tr>"
        for c, label in enumerate(ctx.labels)
    )
    totals = "".join(f"<td class=n><b>{v}</b></td>" for v in [*counts.sum(axis=0), counts.sum()])
    table = (
        f"<table><tr><th>class</th>{''.join(f'<th>{s}</th>' for s in SPLITS)}<th>all</th></tr>{rows}"
        f"<tr><td><b>all</b></td>{totals}</tr></table>"
    )
    per_class = counts.sum(axis=1)
    ratio = per_class.max() / max(per_class.min(), 1)
    imbalance = (
        f"<p>Largest class / smallest class: <b>{ratio:.1f}x</b> ({per_class.max()} vs {per_class.min()} images)."
        + (
            " Classes this uneven bias the layer towards the big ones; the default <code>--class_balance sample"
            "</code> draws classes evenly.</p>"
            if ratio >= 3
            else "</p>"
        )
    )
    skipped = ""
    if ctx.a["skipped_paths"]:
        items = "".join(
            f"<tr><td>{_e(printable(p))}</td><td>{_e(r)}</td></tr>"
            for p, r in zip(ctx.a["skipped_paths"], ctx.a["skipped_reasons"])
        )
        skipped = f"<h3>Skipped files ({len(ctx.a['skipped_paths'])})</h3><table><tr><th>file</th><th>reason</th></tr>{items}</table>"
    else:
        skipped = "<p>No file was skipped.</p>"
    return table + imbalance + skipped


def _training_section(ctx: _Context, fine_tune: dict | None) -> str:
    a = ctx.a
    out = ""
    if "history_step" in a and len(a["history_step"]):
        steps = a["history_step"]
        out += (
            "<div class=charts>"
            + _line_chart(
                "accuracy",
                steps,
                [
                    ("train (batch)", a["history_train_accuracy"], "#4c78a8"),
                    ("validation", a["history_validation_accuracy"], "#f58518"),
                ],
                y_range=(0, 1),
                percent=True,
            )
            + _line_chart(
                "cross entropy",
                steps,
                [
                    ("train (batch)", a["history_cross_entropy"], "#4c78a8"),
                    ("validation", a["history_validation_cross_entropy"], "#f58518"),
                ],
            )
            + "</div>"
        )
        best = ctx.metrics.get("best_step")
        if best:
            out += f"<p>Kept the weights of step {int(best)} (best validation accuracy).</p>"
    cf = ctx.metrics.get("crossfit")
    if cf and len(cf.get("curve_C") or []) > 1:  # the solved layer: its path over C is the training curve
        x = np.log10(cf["curve_C"])
        ticks = [(e, f"{10.0**e:g}") for e in range(-3, 3) if e <= x.max() + 1e-9]
        chosen = (np.log10(cf["C"]), f"chosen C = {cf['C']:.3g}") if cf.get("C") else None
        out += (
            "<div class=charts>"
            + _line_chart(
                "out-of-fold accuracy by regularisation C",
                x,
                [("out-of-fold", cf["curve_accuracy"], "#f58518")],
                y_range=(0, 1),
                percent=True,
                x_name="C",
                x_ticks=ticks,
                marker=chosen,
            )
            + (
                _line_chart(
                    "out-of-fold cross entropy by C (C's criterion)",
                    x,
                    [("out-of-fold", cf["curve_cross_entropy"], "#4c78a8")],
                    x_name="C",
                    x_ticks=ticks,
                    marker=chosen,
                )
                if cf.get("curve_cross_entropy")
                else ""
            )
            + "</div>"
        )
    if cf:
        out += (
            f"<p>Out-of-fold accuracy on training + validation ({cf['folds']} folds, each image scored by a layer "
            f"that never saw it): <b>{100 * cf['accuracy']:.1f}%</b> {_chosen_at(cf)}.</p>"
        )
    if fine_tune and fine_tune.get("history"):
        hist = fine_tune["history"]
        epochs = np.array([h.get("epoch", i) for i, h in enumerate(hist)], dtype=np.float64)
        val = np.array(
            [np.nan if h.get("validation_accuracy") is None else h["validation_accuracy"] for h in hist]
        )
        out += (
            "<h3>Fine-tuning</h3><div class=charts>"
            + _line_chart(
                "validation accuracy by epoch",
                epochs,
                [("validation", val, "#f58518")],
                y_range=(0, 1),
                percent=True,
                x_name="epoch",
            )
            + "</div>"
        )
    return out or "<p>No training curve was recorded.</p>"


def _test_section(ctx: _Context) -> str:
    test = ctx.metrics.get("test")
    if not test or not test.get("count"):
        return (
            "<p>No test images: the test accuracy is not measured (every class is too small, or "
            "<code>--testing_percentage</code> is 0).</p>"
        )
    rows = ""
    for m in test["per_class"]:
        rows += (
            f"<tr><td>{_e(m['label'])}</td><td class=n>{m['support']}</td>"
            f"<td class=n>{_pct_ci(m['precision'], m['precision_ci'])}</td>"
            f"<td class=n>{_pct_ci(m['recall'], m['recall_ci'])}</td>"
            f"<td class=n>{_pct(m['f1'])}</td></tr>"
        )
    table = (
        "<table><tr><th>class</th><th>support</th><th>precision (95% CI)</th><th>recall (95% CI)</th>"
        f"<th>F1</th></tr>{rows}</table>"
    )
    folded = (
        " Measured by the layer before the test images were folded in (<code>--final_fit all</code>): the exported "
        "layer learned from them too, so this is a cautious estimate for it."
        if ctx.metrics.get("final_fit") == "all"
        else ""
    )
    return (
        f"<p>Accuracy <b>{_acc_text(test['correct'], test['count'])}</b>. The interval is Wilson's: with few "
        f"test images it is wide, and it says how far the true accuracy may be from the measured one.{folded}</p>"
        + table
        + "<h3>Confusion matrix</h3><p class=hint>Rows: true class; columns: predicted class. Click a "
        "cell to see its images.</p>"
        + _confusion(ctx, test)
        + "<div id='cell-images' class='gallery'></div>"
        + _misclassified(ctx)
    )


def _confusion(ctx: _Context, test: dict) -> str:
    confusion = np.array(test["confusion"])
    test_rows = np.flatnonzero(ctx.split == TESTING)
    for i in test_rows:
        ctx.cells.setdefault(f"{ctx.y[i]},{ctx.pred[i]}", []).append(int(i))
    for cell in ctx.cells.values():
        for i in cell[:MAX_PER_CELL]:
            ctx.thumb(i)
    peak = max(1, confusion.max())
    head = "".join(f"<th class=rot><span title='{_e(label)}'>{_e(label)}</span></th>" for label in ctx.labels)
    body = ""
    for t, label in enumerate(ctx.labels):
        cells = ""
        for p in range(len(ctx.labels)):
            v = int(confusion[t, p])
            tone = ("d" if t == p else "o") if v else "z"
            alpha = 0.12 + 0.88 * v / peak if v else 0
            cells += (
                f'<td><button class="cell {tone}" data-cell="{t},{p}" style="--a:{alpha:.3f}" '
                f'title="{_e(label)} predicted as {_e(ctx.labels[p])}: {v}">{v}</button></td>'
            )
        body += f"<tr><th class=rowh>{_e(label)}</th>{cells}</tr>"
    return f"<div class=scroll><table class=cm><tr><th></th>{head}</tr>{body}</table></div>"


def _misclassified(ctx: _Context) -> str:
    wrong = [int(i) for i in np.flatnonzero((ctx.split == TESTING) & (ctx.pred != ctx.y))]
    if not wrong:
        return "<h3>Misclassified test images</h3><p>None.</p>"
    wrong.sort(key=lambda i: -float(ctx.proba[i].max()))
    cards = "".join(
        _card(
            ctx,
            i,
            f"true <b>{_e(ctx.labels[ctx.y[i]])}</b><br>predicted <b>{_e(ctx.labels[ctx.pred[i]])}</b>"
            f" ({100 * float(ctx.proba[i].max()):.0f}%)",
        )
        for i in wrong[:MAX_GALLERY]
    )
    more = f"<p>… and {len(wrong) - MAX_GALLERY} more.</p>" if len(wrong) > MAX_GALLERY else ""
    return f"<h3>Misclassified test images ({len(wrong)}), most confident first</h3><div class=gallery>{cards}</div>{more}"


def _card(ctx: _Context, i: int, caption: str, extra: str = "") -> str:
    return (
        f'<figure class=card data-row="{i}">{ctx.thumb(i)}<figcaption><span class=name>{_e(ctx.rel(i))}</span>'
        f"{caption}{extra}</figcaption></figure>"
    )


def _calibration_section(ctx: _Context) -> str:
    """Temperature, ECE before/after and reliability diagrams from metrics.json's ``calibration``, and
    the unknown-score summary from its ``unknown``, when the run recorded them."""
    cal, unknown = ctx.metrics.get("calibration"), ctx.metrics.get("unknown")
    if not cal and not unknown:
        return (
            "<p>This run recorded no calibration figures (temperature, expected calibration error) and no "
            "unknown score. Runs of a retrain version that measures them show them here.</p>"
        )
    out = ""
    if cal:
        facts = [
            (k, v) for k, v in cal.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
        ]
        out += "<table>" + "".join(f"<tr><td>{_e(k)}</td><td class=n>{_num(v)}</td></tr>" for k, v in facts)
        before, after = cal.get("ece_before") or {}, cal.get("ece_after") or {}
        for name in before:
            out += (
                f"<tr><td>ECE on {_e(name)}</td><td class=n>{_num(before[name])} before → "
                f"{_num(after.get(name))} after</td></tr>"
            )
        out += "</table>"
        diagrams = "".join(
            _reliability(name, pair.get("before") or {}, pair.get("after") or {})
            for name, pair in (cal.get("reliability") or {}).items()
            if isinstance(pair, dict)
        )
        if diagrams:
            out += f"<div class=charts>{diagrams}</div>"
    if unknown:
        facts = [
            (k, v) for k, v in unknown.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
        ]
        out += (
            "<h3>Unknown score</h3><table>"
            + "".join(f"<tr><td>{_e(k)}</td><td class=n>{_num(v)}</td></tr>" for k, v in facts)
            + "</table>"
        )
    return out


def _num(v) -> str:
    if v is None:
        return "–"
    return _e(f"{v:.4g}" if isinstance(v, float) else str(v))


def _reliability(name: str, before: dict, after: dict) -> str:
    """A reliability diagram: mean confidence against accuracy per bin, before (grey) and after (blue)."""
    w, h, m = 300, 300, 44

    def sx(v):
        return m + v * (w - 1.5 * m)

    def sy(v):
        return h - m - v * (h - 1.5 * m)

    def dots(bins: dict, colour: str) -> str:
        conf, acc, count = bins.get("confidence") or [], bins.get("accuracy") or [], bins.get("count") or []
        peak = max([c for c in count if c] or [1])
        return "".join(
            f'<circle cx="{sx(c):.1f}" cy="{sy(a):.1f}" r="{2 + 5 * math.sqrt(n / peak):.1f}" fill="{colour}" '
            'opacity="0.75"/>'
            for c, a, n in zip(conf, acc, count or [peak] * len(conf))
            if c is not None and a is not None and n
        )

    return (
        f"<figure class=chartbox><figcaption>reliability on {_e(name)}: grey before, blue after calibration"
        f'</figcaption><svg class=chart viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="reliability diagram">'
        f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" stroke="#aaa" stroke-dasharray="4"/>'
        f"{_axes(w, h, m, 'confidence', 'accuracy')}{dots(before, '#999')}{dots(after, '#4c78a8')}</svg></figure>"
    )


def _label_section(ctx: _Context) -> str:
    order, score = ctx.a["issue_order"], ctx.a["issue_score"]
    suspects = [int(i) for i in order if score[i] >= SUSPECT_SCORE]
    intro = (
        "<p>Every image is scored by a layer that never saw it (out-of-fold for training and validation images, "
        "the layer the test accuracy describes for test images). The score averages 1 − the probability that layer gives the image's "
        "own label and the share of its 10 nearest images (by their features) that carry another label. "
        f"<b>{len(suspects)}</b> image(s) score {SUSPECT_SCORE:.2f} or more: a wrong label, or a hard image.</p>"
        "<p class=hint>Mark each suspect, then download the CSV and run "
        "<code>retrain relabel label_issues.csv</code> (files are moved, never deleted; <code>--undo</code> puts "
        "them back).</p>"
    )
    if not suspects:
        return intro
    cards = "".join(
        _card(
            ctx,
            i,
            f"given <b>{_e(ctx.labels[ctx.y[i]])}</b><br>suggested <b>{_e(ctx.labels[ctx.a['issue_suggested'][i]])}"
            f"</b><br>score {float(score[i]):.2f} · {_e(str(ctx.split[i]))}",
            f'<select class=action data-path-index="{rank}" aria-label="action">'
            "<option value=''>keep</option><option value='move'>move to suggested</option>"
            "<option value='remove'>remove (quarantine)</option></select>",
        )
        for rank, i in enumerate(order[: len(suspects)][:MAX_SUSPECTS])
    )
    more = (
        f"<p>… and {len(suspects) - MAX_SUSPECTS} more in label_issues.csv.</p>"
        if len(suspects) > MAX_SUSPECTS
        else ""
    )
    return (
        intro + f"<div class=gallery>{cards}</div>{more}"
        "<p><button id=download type=button>Download label_issues.csv with these actions</button> "
        "<span id=marked class=hint>0 marked</span></p>"
    )


def _duplicate_section(ctx: _Context) -> str:
    a, summary = ctx.a, (ctx.metrics.get("audit") or {}).get("duplicates") or {}
    n = len(a["dup_i"])
    thr = summary.get("threshold")
    rule = f" (feature similarity ≥ {thr:.2f})" if thr is not None else ""
    if summary.get("rule"):
        rule = f" ({_e(summary['rule'])})"
    out = (
        f"<p><b>{int((a['dup_kind'] == 'exact').sum())}</b> exact copy pair(s) (identical files) and "
        f"<b>{int((a['dup_kind'] == 'near').sum())}</b> near-copy pair(s){rule}.</p>"
    )
    if summary.get("leaked_test_images"):
        out += (
            f"<p class=warn><b>Leakage:</b> {summary['leaked_test_images']} test image(s) have a copy in training or "
            f"validation, so the test accuracy flatters the model. Without them: "
            f"<b>{_fraction(summary['test_accuracy_without_leaked'], summary['test_count_without_leaked'])}</b> "
            f"(with them: {_fraction(summary['test_accuracy_all'], summary['test_count_all'])}).</p>"
        )
    if summary.get("conflicting_pairs"):
        out += f"<p class=warn><b>Conflicts:</b> {summary['conflicting_pairs']} pair(s) carry different labels.</p>"
    if not n:
        return out
    rows = ""
    for i, j, kind, sim in list(zip(a["dup_i"], a["dup_j"], a["dup_kind"], a["dup_similarity"]))[:MAX_PAIRS]:
        flags = []
        if ctx.split[i] != ctx.split[j]:
            flags.append("<span class=tag>crosses splits</span>")
        if ctx.y[i] != ctx.y[j]:
            flags.append("<span class='tag bad'>different labels</span>")
        rows += (
            f"<tr><td>{ctx.thumb(i)}<div class=name>{_e(ctx.rel(i))}</div>{_e(ctx.labels[ctx.y[i]])} · "
            f"{_e(str(ctx.split[i]))}</td><td>{ctx.thumb(j)}<div class=name>{_e(ctx.rel(j))}</div>"
            f"{_e(ctx.labels[ctx.y[j]])} · {_e(str(ctx.split[j]))}</td><td>{_e(str(kind))}<br>{float(sim):.3f}"
            f"<br>{' '.join(flags)}</td></tr>"
        )
    more = f"<p>… and {n - MAX_PAIRS} more in duplicates.csv.</p>" if n > MAX_PAIRS else ""
    return (
        out
        + f"<table class=pairs><tr><th>image</th><th>copy</th><th>kind, similarity</th></tr>{rows}</table>{more}"
    )


def _curve_fits(summary: dict) -> str:
    """How the curve's layers were fitted: solved as the final layer (its C), or a few steps each."""
    if summary.get("C") is not None:
        return f"each solved as the final layer, C = {summary['C']:.3g}"
    return f"{html.escape(str(summary['steps']))} steps each"


def _curve_section(ctx: _Context) -> str:
    a = ctx.a
    summary = (ctx.metrics.get("audit") or {}).get("learning_curve")
    if "lc_sizes" not in a or not summary:
        return "<p>Too few images for a learning curve.</p>"
    sizes, acc = a["lc_sizes"], a["lc_accuracy"]  # (F,), (S, F)
    fit = summary.get("fit")
    chart = _curve_chart(sizes, acc, fit, summary.get("images_now"))
    text = (
        f"<p>The layer fitted on nested {100 * a['lc_fractions'][0]:.0f}%…100% subsets of the training images "
        f"({summary['seeds']} seeds, {_curve_fits(summary)}), scored on held-out images.</p>"
    )
    if fit:
        text += (
            f"<p>Fitted curve: accuracy ≈ {fit['ceiling']:.3f} − {fit['scale']:.3f}·n<sup>−{fit['rate']:.2f}</sup>. "
            f"With the {summary['images_now']} images the final layer used it predicts "
            f"<b>{100 * summary['predicted_now']:.1f}%</b>; twice as many photos of the same kind: "
            f"<b>{100 * summary['predicted_2x']:.1f}%</b> ({100 * summary['gain_2x']:+.1f} points). An "
            "extrapolation, not a promise: it assumes the new photos are like the old ones.</p>"
        )
    per = summary.get("per_class_gain_2x") or {}
    if per:
        mean_recall = _nanmean(a["lc_per_class"][:, -1, :])
        rows = "".join(
            f"<tr><td>{_e(label)}</td><td class=n>{_pct(None if np.isnan(mean_recall[c]) else mean_recall[c])}"
            f"</td><td class=n>{'–' if per.get(label) is None else f'{100 * per[label]:+.1f}'}</td></tr>"
            for c, label in enumerate(ctx.labels)
        )
        text += (
            "<table><tr><th>class</th><th>held-out recall, all images</th><th>points from 2x photos</th></tr>"
            f"{rows}</table>"
        )
    return chart + text


# -- what to do next ----------------------------------------------------------------------------------------
def _next_steps(ctx: _Context) -> str:
    """Advice computed from the sections' numbers, most important first."""
    tips: list[str] = []
    audit = ctx.metrics.get("audit") or {}
    dup = audit.get("duplicates") or {}
    curve = audit.get("learning_curve") or {}
    test = ctx.metrics.get("test") or {}
    if dup.get("leaked_test_images"):
        tips.append(
            f"{dup['leaked_test_images']} test image(s) have a near or exact copy in training: the test accuracy "
            f"without them is <b>{_fraction(dup['test_accuracy_without_leaked'], dup['test_count_without_leaked'])}"
            "</b>. Remove the copies, or give copies a shared <code>_nohash_</code> name so they land in one split."
        )
    if dup.get("conflicting_pairs"):
        tips.append(
            f"{dup['conflicting_pairs']} pair(s) of copies carry different labels: decide which label is "
            "right (see <a href='#duplicates'>duplicates</a>)."
        )
    suspects = int((ctx.a["issue_score"] >= SUSPECT_SCORE).sum())
    if suspects:
        tips.append(
            f"{suspects} image(s) may be mislabelled (layers that never saw them, and their nearest images, "
            "disagree with their label): review them in <a href='#labels'>suspected label "
            "errors</a>, mark them, download the CSV and run <code>retrain relabel label_issues.csv</code>."
        )
    tips += _class_tips(ctx, test, curve)
    gain = curve.get("gain_2x")
    if gain is not None:
        if gain >= 0.01:
            tips.append(
                f"Twice as many photos would add about <b>{100 * gain:+.1f}</b> points overall "
                "(<a href='#curve'>learning curve</a>)."
            )
        else:
            tips.append(
                f"More photos of the same kind would add little ({100 * gain:+.1f} points for twice as "
                "many): look at the confusions and label errors instead, or try <code>--fine_tune</code>."
            )
    if test.get("count") and test.get("accuracy_ci"):
        lo, hi = test["accuracy_ci"]
        if hi - lo > 0.15:
            tips.append(
                f"The test set is small (N={test['count']}): the true accuracy lies anywhere in "
                f"{100 * lo:.0f}–{100 * hi:.0f}%. More images per class measure it more precisely."
            )
    if ctx.a["skipped_paths"]:
        tips.append(
            f"{len(ctx.a['skipped_paths'])} file(s) could not be used (see <a href='#data'>data</a>)."
        )
    if not tips:
        tips.append(
            "Nothing stands out: no leakage, no suspected label error, and more photos would add little."
        )
    return "<ol class=tips>" + "".join(f"<li>{t}</li>" for t in tips) + "</ol>"


def _class_tips(ctx: _Context, test: dict, curve: dict) -> list[str]:
    tips = []
    train_counts = np.bincount(ctx.y[ctx.split == "training"], minlength=len(ctx.labels))
    per_gain = curve.get("per_class_gain_2x") or {}
    per_class = {m["label"]: m for m in test.get("per_class", [])}
    weak = []
    for c, label in enumerate(ctx.labels):
        m = per_class.get(label) or {}
        recall, gain = m.get("recall"), per_gain.get(label)
        if recall is not None and recall < 0.9 and gain is not None and gain >= 0.02:
            weak.append(
                (
                    recall,
                    f"class <b>{_e(label)}</b>: {train_counts[c]} training images, test recall "
                    f"{100 * recall:.0f}% and still rising with data ({100 * gain:+.1f} points for 2x): "
                    f"add photos of {_e(label)}.",
                )
            )
        elif train_counts[c] < FEW_IMAGES and recall is not None and recall < 0.9:
            weak.append(
                (
                    recall,
                    f"class <b>{_e(label)}</b>: {train_counts[c]} training images, test recall "
                    f"{100 * recall:.0f}%; the tutorial asks for at least {FEW_IMAGES} per class.",
                )
            )
    tips += [t for _, t in sorted(weak)]
    confusion = np.array(test.get("confusion") or [[0]])
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    if off.max() > 0:
        t, p = np.unravel_index(off.argmax(), off.shape)
        tips.append(
            f"The most common confusion: <b>{_e(ctx.labels[t])}</b> taken for <b>{_e(ctx.labels[p])}</b> "
            f"in {off[t, p]} of {confusion[t].sum()} test images (click that cell in the "
            "<a href='#test'>confusion matrix</a>)."
        )
    return tips


# -- charts ------------------------------------------------------------------------------------------------
def _axes(w: int, h: int, m: int, x_name: str, y_name: str) -> str:
    return (
        f'<line x1="{m}" y1="{h - m}" x2="{w - m // 2}" y2="{h - m}" stroke="#333"/>'
        f'<line x1="{m}" y1="{m // 2}" x2="{m}" y2="{h - m}" stroke="#333"/>'
        f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle">{_e(x_name)}</text>'
        f'<text x="12" y="{h / 2}" text-anchor="middle" transform="rotate(-90 12 {h / 2})">{_e(y_name)}</text>'
    )


def _line_chart(
    title, x, series, *, y_range=None, percent=False, x_name="step", x_ticks=None, marker=None
) -> str:
    """An SVG line chart; ``x_ticks`` (value, text) pairs replace the five evenly spaced x ticks; ``marker`` =
    (x value, text) draws a dashed vertical line there (e.g. the chosen C)."""
    w, h, m = 460, 260, 56
    x = np.asarray(x, dtype=np.float64)
    ys = [np.asarray(v, dtype=np.float64) for _, v, _ in series]
    finite = np.concatenate([v[np.isfinite(v)] for v in ys]) if ys else np.zeros(0)
    lo, hi = y_range or ((float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1
    x0, x1 = float(x.min()), float(max(x.max(), x.min() + 1))

    def sx(v):
        return m + (v - x0) / (x1 - x0) * (w - 1.5 * m)

    def sy(v):
        return h - m - (v - lo) / (hi - lo) * (h - 1.5 * m)

    lines, legend = "", ""
    for k, ((name, _, colour), v) in enumerate(zip(series, ys)):
        ok = np.isfinite(v)
        if ok.sum() == 0:
            continue
        step = max(1, int(ok.sum()) // 400)  # at most ~400 points per line
        pts = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in list(zip(x[ok], v[ok]))[::step])
        lines += f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{pts}"/>'
        legend += (
            f'<rect x="{w - 150}" y="{10 + 16 * k}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{w - 136}" y="{19 + 16 * k}">{_e(name)}</text>'
        )
    fmt = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.2g}")
    ticks = "".join(
        f'<text x="{m - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{fmt(v)}</text>'
        f'<line x1="{m}" x2="{w - m // 2}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>'
        for v in np.linspace(lo, hi, 5)
    )
    xt = "".join(
        f'<text x="{sx(v):.1f}" y="{h - m + 16}" text-anchor="middle">{_e(text)}</text>'
        for v, text in (x_ticks or [(v, f"{v:.0f}") for v in np.linspace(x0, x1, 5)])
    )
    mark = ""
    if marker is not None:
        mx = sx(float(marker[0]))
        mark = (
            f'<line class="marker" x1="{mx:.1f}" x2="{mx:.1f}" y1="{m / 2:.1f}" y2="{h - m}" stroke="#888" '
            f'stroke-dasharray="4 3"/><text x="{mx - 4:.1f}" y="{(h - m / 2) / 2:.1f}" text-anchor="end" fill="#555">'
            f"{_e(marker[1])}</text>"
        )
    return (
        f'<figure class=chartbox><figcaption>{_e(title)}</figcaption><svg class=chart viewBox="0 0 {w} {h}" '
        f'width="{w}" height="{h}" role="img" aria-label="{_e(title)}">{ticks}{xt}{_axes(w, h, m, x_name, "")}'
        f"{mark}{lines}{legend}</svg></figure>"
    )


def _curve_chart(sizes: np.ndarray, acc: np.ndarray, fit: dict | None, now: int | None) -> str:
    w, h, m = 520, 300, 50
    far = 2 * max(float(sizes.max()), float(now or 0))
    lo = max(0.0, float(np.nanmin(acc)) - 0.05)

    def sx(v):
        return m + math.log(v / sizes.min()) / math.log(far / sizes.min()) * (w - 1.5 * m)

    def sy(v):
        return h - m - (v - lo) / (1 - lo) * (h - 1.5 * m)

    dots = "".join(
        f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="#4c78a8" opacity="0.6"/>'
        for row in acc
        for s, v in zip(sizes, row)
        if np.isfinite(v)
    )
    mean = _nanmean(acc)
    line = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in zip(sizes, mean))
    fitted = ""
    if fit:
        xs = np.geomspace(sizes.min(), far, 60)
        ys = np.clip(fit["ceiling"] - fit["scale"] * xs ** -fit["rate"], lo, 1)
        pts = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(xs, ys))
        fitted = f'<polyline fill="none" stroke="#e45756" stroke-dasharray="5 3" stroke-width="1.8" points="{pts}"/>'
    marks = ""
    if now:
        for v, name in ((now, "now"), (2 * now, "2x")):
            marks += (
                f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{m // 2}" y2="{h - m}" stroke="#999" '
                f'stroke-dasharray="2 3"/><text x="{sx(v):.1f}" y="{m // 2 - 2}" text-anchor="middle">{name}'
                "</text>"
            )
    ticks = "".join(
        f'<text x="{m - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{100 * v:.0f}%</text>'
        for v in np.linspace(lo, 1, 5)
    )
    xt = "".join(
        f'<text x="{sx(v):.1f}" y="{h - m + 16}" text-anchor="middle">{v:.0f}</text>'
        for v in np.geomspace(sizes.min(), far, 5)
    )
    return (
        f"<figure class=chartbox><figcaption>accuracy vs training images (log scale); dots: seeds, solid: mean, "
        f'dashed: fitted curve</figcaption><svg class=chart id=curve-chart viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" role="img" aria-label="learning curve">{ticks}{xt}'
        f"{_axes(w, h, m, 'training images', 'accuracy')}{marks}{dots}"
        f'<polyline fill="none" stroke="#4c78a8" stroke-width="2" points="{line}"/>{fitted}</svg></figure>'
    )


# -- small helpers -----------------------------------------------------------------------------------------
def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (and no warning) where a column has no number."""
    ok = np.isfinite(values)
    total = np.where(ok, values, 0).sum(axis=0)
    count = ok.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _script_json(data: dict) -> str:
    """JSON that is safe inside <script>: no "</script>", no "<!--" can be formed from file names."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _acc_text(k: int | None, n: int | None) -> str:
    if not n:
        return "not measured"
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f}% (N={n}, 95% CI {100 * lo:.1f}–{100 * hi:.1f}%)"


def _fraction(acc: float | None, n: int | None) -> str:
    if acc is None or not n:
        return "not measurable"
    return _acc_text(int(round(acc * n)), n)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _pct_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}% <span class=ci>({100 * ci[0]:.0f}–{100 * ci[1]:.0f})</span>"


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
header{background:#fff;border-bottom:1px solid #ddd;padding:14px 24px 6px}
h1{margin:0;font-size:22px}.sub{margin:2px 0;color:#666;font-size:13px;word-break:break-all}
.headline{margin:6px 0;font-size:17px}nav a{margin-right:14px;font-size:14px;color:#2a5db0;text-decoration:none}
main{padding:0 24px 40px;max-width:1200px}section{background:#fff;border:1px solid #e2e2e6;border-radius:8px;
padding:4px 18px 14px;margin:18px 0}h2{font-size:19px;margin:12px 0 8px}h3{font-size:16px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}.ci{color:#777;font-size:12px}
.hint{color:#666;font-size:13px}.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:6px 10px}
.scroll{overflow-x:auto}table.cm td{padding:1px;border:0}table.cm th.rot{vertical-align:bottom;
padding:0 0 4px}table.cm th.rot span{display:inline-block;writing-mode:vertical-rl;transform:rotate(180deg);
max-height:170px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-weight:500;font-size:13px}
th.rowh{text-align:right;font-weight:500;font-size:13px;white-space:nowrap;vertical-align:middle}button.cell{width:44px;height:34px;border:1px solid #ddd;border-radius:4px;
cursor:pointer;font:inherit;font-variant-numeric:tabular-nums}button.cell.d{background:rgba(46,140,80,var(--a));
color:#000}button.cell.o{background:rgba(214,64,48,var(--a))}button.cell.z{background:#fafafa;color:#bbb}
button.cell.sel{outline:3px solid #2a5db0}.gallery{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
figure.card{margin:0;width:150px;background:#fafafa;border:1px solid #e4e4e8;border-radius:6px;padding:6px;
font-size:12.5px}figure.card img,td img.th{width:112px;height:112px;object-fit:contain;background:#eee;
display:block;margin:0 auto 4px}.name{display:block;color:#555;word-break:break-all;font-size:11.5px}
select.action{margin-top:4px;width:100%}.tag{background:#e7eefb;border-radius:3px;padding:0 4px;font-size:11px}
.tag.bad{background:#fde2df}.tips li{margin:4px 0}figure.chartbox{display:inline-block;margin:6px 18px 6px 0}
figure.chartbox figcaption{font-size:13px;color:#444}svg.chart{font-size:11px;background:#fff;max-width:100%;
height:auto}code{background:#f0f0f3;padding:0 3px;border-radius:3px}#cell-images:empty{display:none}
#cell-images{border:1px dashed #bbb;padding:8px;border-radius:6px}.charts{display:flex;flex-wrap:wrap}
"""

# The script only reads the JSON block and sets textContent / src / value: no HTML is ever parsed from data.
_JS = """
(function(){
'use strict';
const D = JSON.parse(document.getElementById('report-data').textContent);
const actions = {};
for (const img of document.querySelectorAll('img.th')) {
  const uri = D.thumbs[img.dataset.row];
  if (uri) img.src = uri;
}
function el(tag, cls, text){ const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function showCell(btn){
  for (const b of document.querySelectorAll('button.cell.sel')) b.classList.remove('sel');
  btn.classList.add('sel');
  const [t, p] = btn.dataset.cell.split(',').map(Number);
  const rows = D.cells[btn.dataset.cell] || [];
  const box = document.getElementById('cell-images');
  box.replaceChildren();
  const title = el('p', '', D.labels[t] + ' predicted as ' + D.labels[p] + ': ' + rows.length + ' image(s)');
  title.style.width = '100%';
  box.appendChild(title);
  for (const r of rows) {
    const row = D.rows[r]; const card = el('figure', 'card'); card.dataset.row = r;
    const uri = D.thumbs[r];
    if (uri) { const img = el('img', 'th'); img.src = uri; img.alt = row[0]; card.appendChild(img); }
    const cap = el('figcaption'); cap.appendChild(el('span', 'name', row[0]));
    cap.appendChild(document.createTextNode(D.labels[row[2]] + ' (' + Math.round(100 * row[3]) + '%)'));
    card.appendChild(cap); box.appendChild(card);
  }
}
for (const b of document.querySelectorAll('button.cell')) b.addEventListener('click', () => showCell(b));
function csvField(v){ v = String(v); return /[",\\r\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function updateMarked(){
  const n = Object.values(actions).filter(Boolean).length;
  const m = document.getElementById('marked'); if (m) m.textContent = n + ' marked';
}
for (const s of document.querySelectorAll('select.action')) {
  s.addEventListener('change', () => { actions[s.dataset.pathIndex] = s.value; updateMarked(); });
}
const dl = document.getElementById('download');
if (dl) dl.addEventListener('click', () => {
  const lines = ['path,given_label,suggested_label,score,rank,split,action'];
  D.issues.forEach((r, k) => lines.push(r.concat([actions[k] || '']).map(csvField).join(',')));
  const a = el('a'); a.download = 'label_issues.csv';
  a.href = 'data:text/csv;charset=utf-8,' + encodeURIComponent(lines.join('\\r\\n') + '\\r\\n');
  document.body.appendChild(a); a.click(); a.remove();
});
document.body.dataset.ready = '1';
})();
"""


# -- `retrain report RUN_DIR` ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="retrain report",
        description="Rebuild report.html of a finished run from the files it saved (no retraining).",
    )
    p.add_argument("run_dir", nargs="?", default="retrain_runs/latest", help="the run's folder")
    ns = p.parse_args(argv)
    t0 = time.perf_counter()
    path = write_report(ns.run_dir)
    print(f"Wrote {printable(str(path))} in {time.perf_counter() - t0:.1f} s")
    return 0


def _chosen_at(cf: dict) -> str:
    """Where the cross-fit's choice lies: a regularisation C (the L-BFGS layer) or a number of steps."""
    if cf.get("C") is not None:
        return (
            f"with regularisation C = {float(cf['C']):.3g}, chosen by the out-of-fold cross entropy (L-BFGS logistic "
            "regression)"
        )
    return f"at {html.escape(str(cf.get('best_steps')))} steps"
