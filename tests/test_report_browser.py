"""report.html in a real headless Chromium: renders offline, a confusion-matrix cell shows its images,
the edited CSV downloads, no console error, no request, a screenshot that is not blank; and the same
for odd runs: skipped files and a class with one image, and 10,000 images.

Install what it needs with .ci/install-browser.sh; without it the tests are skipped.
"""

from __future__ import annotations

import io
import os
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain
from browser import TIMEOUT, require_browser, start_chromium
from conftest import make_image_folder

require_browser()  # skips this module, with the reason, without Chromium

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report-run")
    root = make_image_folder(tmp / "images", per_class=14)
    shutil.move(root / "red" / "img_003.jpg", root / "green" / "moved_red.jpg")  # a label error
    shutil.move(root / "blue" / "img_002.jpg", root / "blue" / f"{EVIL} café.jpg")
    result = retrain.train(
        root,
        architecture="tiny_test_backbone",
        bottleneck_dir=str(tmp / "bottlenecks"),
        model_dir=str(tmp / "models"),
        output_dir=str(tmp / "out"),
        how_many_training_steps=200,
        eval_step_interval=50,
        seed=1,
        quiet=True,
    )
    return result.run_dir / "report.html"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), window="1200,1000", console_log=True)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, report: Path):
    browser.get(report.as_uri())
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready")
    )


def test_the_report_renders_offline_and_a_cell_shows_its_images(browser, report, tmp_path):
    _open(browser, report)
    assert browser.find_element(By.TAG_NAME, "h1").text == "retrain report"
    cells = [c for c in browser.find_elements(By.CSS_SELECTOR, "button.cell") if int(c.text) > 0]
    cell = max(cells, key=lambda c: int(c.text))
    count = int(cell.text)
    browser.execute_script("arguments[0].scrollIntoView()", cell)
    cell.click()
    box = browser.find_element(By.ID, "cell-images")
    cards = box.find_elements(By.CSS_SELECTOR, "figure.card")
    assert len(cards) == count
    thumbs = box.find_elements(By.CSS_SELECTOR, "img")
    assert thumbs and all(t.get_attribute("src").startswith("data:image/jpeg;base64,") for t in thumbs)
    assert all(browser.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
    # The HTML-looking file name is text, never an element.
    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert f"{EVIL} café.jpg" in page_text
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    # Nothing was requested: every resource the page holds is inline.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls == [], urls
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors

    shot = tmp_path / "report.png"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shot))
    if os.environ.get("RETRAIN_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["RETRAIN_SCREENSHOT_DIR"]) / "report.png")
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float32)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50  # text, tables and thumbnails, not a blank page


def test_marked_suspects_download_as_an_edited_csv(browser, report):
    _open(browser, report)
    # Capture the download link instead of letting the browser save a file.
    browser.execute_script(
        "window.__downloads = []; HTMLAnchorElement.prototype.click = function () {"
        " window.__downloads.push([this.download, this.href]); };"
    )
    select = browser.find_elements(By.CSS_SELECTOR, "select.action")[0]
    browser.execute_script("arguments[0].scrollIntoView()", select)
    Select(select).select_by_value("move")
    assert browser.find_element(By.ID, "marked").text == "1 marked"
    browser.find_element(By.ID, "download").click()
    ((name, href),) = browser.execute_script("return window.__downloads")
    assert name == "label_issues.csv" and href.startswith("data:text/csv")
    text = urllib.parse.unquote(href.split(",", 1)[1])
    lines = text.strip().split("\r\n")
    assert lines[0] == "path,given_label,suggested_label,score,rank,split,action"
    first = lines[1].split(",")
    assert first[-1] == "move" and first[1] == "green" and first[2] == "red"
    assert all(not line.endswith(",move") for line in lines[2:])


@pytest.fixture(scope="module")
def odd_reports(tmp_path_factory) -> dict[str, Path]:
    """A run with an unreadable file and a class of one image, and a 10,000-image run."""
    from retrain.report import write_report
    from test_report import _synthetic_run

    tmp = tmp_path_factory.mktemp("odd-runs")
    root = make_image_folder(tmp / "images", per_class=10)
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "lonely").mkdir()
    shutil.copy(root / "green" / "img_000.jpg", root / "lonely" / "only.jpg")
    result = retrain.train(
        root,
        architecture="tiny_test_backbone",
        bottleneck_dir=str(tmp / "bottlenecks"),
        model_dir=str(tmp / "models"),
        output_dir=str(tmp / "out"),
        how_many_training_steps=200,
        eval_step_interval=50,
        seed=1,
        quiet=True,
    )
    (tmp / "big").mkdir()
    big = _synthetic_run(tmp / "big")
    write_report(big)
    return {"skipped and one image": result.run_dir / "report.html", "10,000 images": big / "report.html"}


@pytest.mark.parametrize("which", ["skipped and one image", "10,000 images"])
def test_odd_runs_render_and_their_cells_open(browser, odd_reports, which):
    _open(browser, odd_reports[which])
    text = browser.find_element(By.TAG_NAME, "body").text
    if which == "skipped and one image":
        assert "broken.jpg" in text and "lonely" in text
    cells = [c for c in browser.find_elements(By.CSS_SELECTOR, "button.cell") if int(c.text) > 0]
    cell = max(cells, key=lambda c: int(c.text))
    browser.execute_script("arguments[0].scrollIntoView()", cell)
    cell.click()
    cards = browser.find_element(By.ID, "cell-images").find_elements(By.CSS_SELECTOR, "figure.card")
    assert len(cards) == int(cell.text)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
