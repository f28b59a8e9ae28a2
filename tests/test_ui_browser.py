"""`retrain ui` in a real headless Chromium: the whole journey with the mouse, on the bundled photos.

Create classes by uploading photos, check them, train, read the accuracy, open a confusion-matrix cell,
see the Fix step's state, classify a photo, download the model and classify with it through `label_image`.
A screenshot of each step is kept under the test's tmp folder (``ui-screenshots``) and checked non-blank.
Needs Chromium and chromedriver (.ci/install-browser.sh); the real EfficientNet-Lite0, so `slow`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import TIMEOUT, require_browser, start_chromium
from trained_models import SAMPLE_PHOTOS

require_browser()  # skips this module, with the reason, without Chromium

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
CLASSES = {"fish": "fish", "landmarks": "landmarks", "tools <b>&amp;": "tools"}  # shown name -> sample folder


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    project = tmp_path_factory.mktemp("ui-project")
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrain", "ui", "--project", str(project), "--port", "0", "--no_browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = None
    for line in proc.stdout:
        m = re.search(r"Open (http://\S+/)", line)
        if m:
            url = m[1]
            break
    assert url, "retrain ui printed no URL"
    try:
        yield url, project
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    driver = start_chromium(
        tmp_path_factory.mktemp("chromium-profile"), window="1200,1000", downloads=downloads
    )
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "ui-screenshots"
    folder.mkdir(exist_ok=True)
    return folder


def _shot(browser, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    browser.save_screenshot(str(path))
    px = np.asarray(Image.open(path).convert("RGB"))
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3)[::97], axis=0)) > 30, f"{path} looks blank"
    return path


def _photos(folder: str, n: int, skip: int = 0) -> list[Path]:
    return sorted((SAMPLE_PHOTOS / folder).glob("*.jpg"))[skip : skip + n]


def _body(browser, key: str) -> str:
    return browser.find_element(By.TAG_NAME, "body").get_attribute(f"data-{key}") or ""


def test_the_whole_journey(browser, app_url, shots, tmp_path):
    try:
        _journey(browser, app_url, shots)
    except Exception:
        browser.save_screenshot(str(shots / "failure.png"))
        print("page message:", browser.find_element(By.ID, "message").text, file=sys.stderr)
        raise


def _journey(browser, app_url, shots):
    url, project = app_url
    # The page re-renders as it polls: an element found a moment ago may be gone, so look again.
    wait = WebDriverWait(browser, TIMEOUT, ignored_exceptions=(StaleElementReferenceException,))
    t0 = time.monotonic()
    browser.get(url)
    wait.until(lambda d: _body(d, "ready") == "1")
    load_s = time.monotonic() - t0
    assert load_s < 3, f"page usable after {load_s:.2f} s"
    _shot(browser, shots, "1-start")

    # 1. Data: classes created and filled by uploads (one name with HTML in it, shown as text)
    for name, folder in CLASSES.items():
        browser.find_element(By.ID, "new-class").send_keys(name)
        browser.find_element(By.ID, "add-class").click()
        wait.until(
            lambda d, n=name: any(
                c.get_attribute("data-class") == n for c in d.find_elements(By.CSS_SELECTOR, "#classes .card")
            )
        )
        card = next(
            c
            for c in browser.find_elements(By.CSS_SELECTOR, "#classes .card")
            if c.get_attribute("data-class") == name
        )
        card.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
            "\n".join(str(p) for p in _photos(folder, 12))
        )
        wait.until(
            lambda d, n=name: any(
                c.get_attribute("data-class") == n and c.find_element(By.CSS_SELECTOR, ".count").text == "12"
                for c in d.find_elements(By.CSS_SELECTOR, "#classes .card")
            )
        )
    names = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#classes .card h4")]
    assert names == sorted(CLASSES)  # the HTML name is its text
    assert not browser.find_elements(By.CSS_SELECTOR, "#classes b")
    browser.find_element(By.ID, "check").click()
    wait.until(lambda d: d.find_elements(By.ID, "counts"))
    browser.find_elements(By.CSS_SELECTOR, "#classes .card button")[0].click()  # browse the first class
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 12)
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#thumbs img')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    _shot(browser, shots, "2-data")

    # 2. Train
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=train]").click()
    steps = browser.find_element(By.NAME, "how_many_training_steps")
    steps.clear()
    steps.send_keys("500")
    browser.find_element(By.ID, "start").click()
    WebDriverWait(browser, 300).until(lambda d: _body(d, "training") in ("finished", "failed", "cancelled"))
    assert _body(browser, "training") == "finished", browser.find_element(By.ID, "log").text
    assert browser.find_elements(By.CSS_SELECTOR, "#acc-chart polyline")
    _shot(browser, shots, "3-train")

    # 3. Understand: accuracy, then a confusion-matrix cell's photos
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=understand]").click()
    wait.until(
        lambda d: d.find_elements(By.ID, "accuracy") and d.find_elements(By.CSS_SELECTOR, "#matrix td.cell")
    )
    accuracy = float(browser.find_element(By.ID, "accuracy").text.rstrip("%"))
    assert 50 <= accuracy <= 100
    cell = next(c for c in browser.find_elements(By.CSS_SELECTOR, "#matrix td.cell") if c.text != "0")
    count = int(cell.text)
    cell.click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cell-photos img")) == count)
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#cell-photos img')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    _shot(browser, shots, "4-understand")

    # 4. Fix: the relabel module's review, or a visible "not available"
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=fix]").click()
    wait.until(lambda d: d.find_element(By.ID, "fix-body").text)
    _shot(browser, shots, "5-fix")
    issues = browser.find_elements(By.CSS_SELECTOR, "#fix-body .issue")
    if issues:  # this version has the audit and relabel: move the most suspect photo, then retrain
        first = issues[0].get_attribute("data-path")
        issues[0].find_element(By.XPATH, ".//button[text()='Move']").click()
        wait.until(lambda d: "moved to" in d.find_element(By.CSS_SELECTOR, "#fix-body .issue").text)
        assert browser.find_element(By.CSS_SELECTOR, "#fix-body .issue").get_attribute("data-path") == first
        _shot(browser, shots, "5b-fixed")
        browser.find_element(By.CSS_SELECTOR, "nav button[data-go=train]").click()
        old_run = browser.find_element(By.ID, "run-id").text
        browser.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.ID, "run-id").text != old_run)
        WebDriverWait(browser, 300).until(
            lambda d: (
                _body(d, "training") in ("finished", "failed", "cancelled")
                and d.find_element(By.ID, "phase").text == _body(d, "training")
            )
        )
        assert _body(browser, "training") == "finished", browser.find_element(By.ID, "log").text
    else:
        assert (
            "not available" in browser.find_element(By.ID, "fix-body").text.lower()
            or "no list of suspected label errors" in browser.find_element(By.ID, "fix-body").text
        )

    # 5. Try: a fish photo that was not uploaded
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=try]").click()
    photo = _photos("fish", 1, skip=20)[0]
    browser.find_element(By.ID, "try-file").send_keys(str(photo))
    wait.until(lambda d: _body(d, "tried") == "1")
    assert browser.find_element(By.ID, "top-label").text == "fish"
    _shot(browser, shots, "6-try")

    # 6. Export: download the model, then classify with label_image
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=export]").click()
    wait.until(lambda d: d.find_elements(By.ID, "download-model"))
    _shot(browser, shots, "7-export")
    browser.find_element(By.ID, "download-model").click()
    model = browser.downloads / "output_graph.onnx"
    wait.until(lambda d: model.exists() and not list(browser.downloads.glob("*.crdownload")))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from retrain.cli import label_image_main; sys.exit(label_image_main())",
            "--graph",
            str(model),
            "--image",
            str(photo),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    ranked = json.loads(out.stdout.splitlines()[0])["predictions"]
    assert ranked[0]["label"] == "fish" and {p["label"] for p in ranked} == set(CLASSES)
    # nothing was fetched from anywhere but the app
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(url.rstrip("/")) or u.startswith("blob:") for u in urls), urls
    assert not (project.parent / "x.jpg").exists()
