"""A multi-label run's report.html and `retrain serve`'s page on a multi-label model, in headless Chromium:
the per-label table and galleries render offline with escaped names, the gallery filter works, and the
page shows each photo's label set with every label's threshold marked.

Install what it needs with .ci/install-browser.sh; without it the tests are skipped.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import TIMEOUT, require_browser, start_chromium
from multilabel_runs import EVIL, LABELS, make_multilabel_run, multilabel_model
from retrain.predict import load
from retrain.report import write_report
from trained_models import running_server

require_browser()  # skips this module, with the reason, without Chromium

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), window="1200,1000", console_log=True)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(browser, path: Path) -> np.ndarray:
    browser.save_screenshot(str(path))
    if os.environ.get("RETRAIN_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["RETRAIN_SCREENSHOT_DIR"]) / path.name)
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L"), dtype=np.float32)


def test_the_multi_label_report_renders_offline_and_filters_its_galleries(browser, tmp_path):
    report = write_report(make_multilabel_run(tmp_path))
    browser.get(report.as_uri())
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready")
    )
    assert browser.find_element(By.TAG_NAME, "h1").text == "retrain report multi-label"
    rows = browser.find_elements(By.CSS_SELECTOR, "#per-label tr[data-label]")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == LABELS  # the HTML-looking label as text
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert f"{EVIL} photo 39.jpg" in browser.find_element(By.TAG_NAME, "body").text
    cards = browser.find_elements(By.CSS_SELECTOR, "#missed-gallery figure.card")
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#missed-gallery img.th")
    assert cards and len(thumbs) == len(cards)
    assert all(browser.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
    # The filter keeps the photos whose missed labels include the chosen one.
    select = browser.find_element(By.CSS_SELECTOR, "select[data-gallery=missed]")
    browser.execute_script("arguments[0].scrollIntoView()", select)
    Select(select).select_by_value(EVIL)
    shown = [c for c in cards if c.is_displayed()]
    assert 0 < len(shown) < len(cards)
    assert all(EVIL in c.get_attribute("data-wrong").split("\t") for c in shown)
    Select(select).select_by_value("")
    assert all(c.is_displayed() for c in cards)
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls == [], urls
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
    browser.execute_script("document.getElementById('test').scrollIntoView()")
    pixels = _screenshot(browser, tmp_path / "report-multilabel.png")
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50


def _classify(browser, url: str, photos: list[Path]) -> list:
    browser.get(f"{url}/")
    wait = WebDriverWait(browser, TIMEOUT)
    wait.until(lambda d: "several per photo" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in photos))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    return browser.find_elements(By.CSS_SELECTOR, "#results .result")


def test_the_served_page_shows_the_label_set_and_thresholds(browser, tmp_path_factory, tmp_path):
    model = multilabel_model(tmp_path_factory)
    clf = load(model.output_graph)
    photos = sorted({p.name: p for p in Path(model.config.image_dir).rglob("*.jpg")}.values())[:3]
    with running_server(model.output_graph) as url:
        cards = _classify(browser, url, photos)
        assert len(cards) == len(photos)
        for card, photo in zip(cards, photos):
            (ranked,) = clf.classify([str(photo)])
            labelset = card.find_element(By.CSS_SELECTOR, ".labelset").text
            assert labelset == (
                "labels: " + ", ".join(ranked.labels) if ranked.labels else "no label above its threshold"
            )
            preds = card.find_elements(By.CSS_SELECTOR, ".pred")
            assert [p.find_element(By.CSS_SELECTOR, ".label").text for p in preds] == [
                p.label for p in ranked
            ]
            assert [p.get_attribute("class") == "pred chosen" for p in preds] == [
                p.label in ranked.labels for p in ranked
            ]
            for p, pr in zip(preds, ranked):  # each bar has its label's threshold marked
                tick = p.find_element(By.CSS_SELECTOR, ".tick")
                t = float(clf.thresholds[clf.labels.index(pr.label)])
                assert tick.get_attribute("title") == f"threshold {100 * t:.1f}%"
        assert any(ranked.labels for ranked in clf.classify([str(p) for p in photos]))
        pixels = _screenshot(browser, tmp_path / "serve-multilabel.png")
        assert pixels.std() > 20
    # A model whose thresholds no photo reaches: the page says so instead of naming a label.
    strict = multilabel_model(tmp_path_factory, threshold=0.999)
    with running_server(strict.output_graph) as url:
        (card,) = _classify(browser, url, photos[:1])
        assert card.find_element(By.CSS_SELECTOR, ".labelset").text == "no label above its threshold"
        assert card.find_elements(By.CSS_SELECTOR, ".pred.chosen") == []


def test_the_ui_try_step_shows_the_label_set(browser, tmp_path_factory, tmp_path):
    import re
    import subprocess
    import sys

    model = multilabel_model(tmp_path_factory)
    clf = load(model.output_graph)
    project = tmp_path / "project"
    shutil.copytree(model.run_dir, project / "runs" / "ml-run")  # a finished run, as if trained in the app
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrain", "ui", "--project", str(project), "--port", "0", "--no_browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = next((m[1] for line in proc.stdout if (m := re.search(r"Open (http://\S+/)", line))), None)
        assert url, "retrain ui printed no URL"
        browser.get(url)
        wait = WebDriverWait(browser, TIMEOUT)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "button[data-go=try]").is_displayed())
        browser.find_element(By.CSS_SELECTOR, "button[data-go=try]").click()
        wait.until(lambda d: d.find_element(By.ID, "try-run").text == "ml-run")
        photo = next(
            p for p in sorted(Path(model.config.image_dir).rglob("*.jpg")) if clf.classify([str(p)])[0].labels
        )
        browser.find_element(By.ID, "try-file").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-tried") == "1")
        (ranked,) = clf.classify([str(photo)])
        assert browser.find_element(By.ID, "top-label").text == "labels: " + ", ".join(ranked.labels)
        rows = browser.find_elements(By.CSS_SELECTOR, "#try-result .pred")
        assert [r.find_element(By.CSS_SELECTOR, ".label").text for r in rows] == [p.label for p in ranked][:5]
        assert ["chosen" in r.get_attribute("class") for r in rows] == [
            p.label in ranked.labels for p in ranked
        ][:5]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#try-result .pred .tick")) == len(rows)
        _screenshot(browser, tmp_path / "ui-try-multilabel.png")
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stdout.close()
