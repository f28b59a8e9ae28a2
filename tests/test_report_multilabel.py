"""report.html of a multi-label run: per-label table instead of the confusion matrix, missed and spurious
labels, data counts per label; escaped; rebuilt by `retrain report`; a real --multi_label run writes it."""

from __future__ import annotations

import json
import re

import numpy as np

from multilabel_runs import EVIL, LABELS, make_multilabel_run, multilabel_model
from retrain.cli import retrain_main
from retrain.report import REPORT_FILE, write_report


def _section(page: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S).group(1)


def test_the_multi_label_report_shows_per_label_figures_and_galleries(tmp_path):
    run = make_multilabel_run(tmp_path)
    page = write_report(run).read_text(encoding="utf-8")
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["multi_label"]["test"]
    with np.load(run / "multilabel.npz") as z:
        truth, probs, split = z["truth"], z["probs"], z["split"]
    # The headline: mAP, example F1 (and at 0.5), exact match.
    headline = re.search(r"id=headline>(.*?)</p>", page).group(1)
    for key in ("mAP", "example_f1", "example_f1_at_0.5", "exact_match"):
        assert f"{100 * test[key]:.1f}%" in headline, key
    # One row per label with its AP, threshold and Wilson intervals; no confusion matrix.
    table = re.search(r"<table id=per-label>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr[^>]*data-label='([^']*)'>(.*?)</tr>", table)
    assert len(rows) == len(LABELS)
    for (_, cells), label in zip(rows, LABELS):
        s = test["per_label"][label]
        assert f"{100 * s['ap']:.1f}%" in cells and f"{s['threshold']:.2f}" in cells
        assert f"<td class=n>{s['support']}</td>" in cells
    assert "0.30*" in table  # sky's threshold is the shared one
    assert table.count("<span class=ci>(") == 2 * len(LABELS)
    assert "class=cm" not in page and 'button class="cell' not in page
    assert "not available for multi-label runs yet" in page
    # Counts per label and split, and label-set sizes, from multilabel.npz.
    counts = re.search(r"<table id=label-counts>(.*?)</table>", page, re.S).group(1)
    beach = re.search(r"<td>beach</td>(.*?)</tr>", counts).group(1)
    want = [int(truth[split == s, 0].sum()) for s in ("training", "validation", "testing")]
    assert re.findall(r"<td class=n>(\d+)</td>", beach) == [str(v) for v in [*want, sum(want)]]
    sizes = re.search(r"<table id=label-set-sizes>(.*?)</table>", page, re.S).group(1)
    assert f"<td class=n>{len(LABELS)}</td>" in sizes  # the photo with every label
    # Galleries: each test photo with a missed (spurious) label once, the most confident mistake first.
    te = np.flatnonzero(split == "testing")
    pred = probs >= np.array(metrics["thresholds"])
    for sid, wrong in (("missed", truth & ~pred), ("spurious", pred & ~truth)):
        cards = re.findall(r"<figure class='card ml' data-row='(\d+)'", _section(page, sid))
        assert sorted(map(int, cards)) == [int(i) for i in te if wrong[i].any()], sid
    first_missed = int(re.search(r"data-row='(\d+)'", _section(page, "missed")).group(1))
    assert probs[first_missed][truth[first_missed] & ~pred[first_missed]].min() <= 0.03
    # Thumbnails are embedded; nothing is loaded from anywhere.
    data = json.loads(re.search(r"id='report-data'>(.*?)</script>", page).group(1))
    assert data["thumbs"] and all(u.startswith("data:image/jpeg;base64,") for u in data["thumbs"].values())
    assert 'src="http' not in page and "src='http" not in page


def test_html_looking_labels_and_file_names_are_text(tmp_path):
    run = make_multilabel_run(tmp_path)
    page = write_report(run).read_text(encoding="utf-8")
    assert EVIL not in page and "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert f"&lt;img src=x onerror=alert(1)&gt; photo {39:02d}.jpg" in page  # a file name
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in page  # a label
    # In the script's JSON block too: no "<" that could close it.
    block = re.search(r"id='report-data'>(.*?)</script>", page, re.S).group(1)
    assert "<" not in block


def test_retrain_report_rebuilds_it_and_copes_without_the_npz(tmp_path, capsys):
    run = make_multilabel_run(tmp_path)
    assert retrain_main(["report", str(run)]) == 0
    assert "Wrote" in capsys.readouterr().out and (run / REPORT_FILE).exists()
    (run / "multilabel.npz").unlink()
    page = write_report(run).read_text(encoding="utf-8")
    assert "<table id=per-label>" in page and "multilabel.npz is missing" in page
    assert "<span class=ci>(" not in re.search(r"<table id=per-label>(.*?)</table>", page, re.S).group(1)
    (run / "multilabel.npz").write_bytes(b"not a zip")
    assert retrain_main(["report", str(run)]) == 2
    assert "multilabel.npz is damaged" in capsys.readouterr().err


def test_a_run_without_test_images_says_so(tmp_path):
    run = make_multilabel_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["multi_label"]["test"] = None
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run).read_text(encoding="utf-8")
    assert "Test mAP <b>not measured</b>" in page and "No test images" in page


def test_a_real_multi_label_run_writes_the_report(tmp_path_factory):
    result = multilabel_model(tmp_path_factory)  # retrain.train(..., multi_label=True) on the tiny backbone
    page = (result.run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert "<table id=per-label>" in page and "Missed labels" in page
    for label in ("blue", "green", "red"):
        assert f"<td>{label}</td>" in page
    # Names in the page are relative to the image folder (config.json's image_dir), named once in the header.
    assert page.count(result.config.image_dir) == 1 and "images from " + result.config.image_dir in page
