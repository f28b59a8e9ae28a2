"""`retrain ui` in a real headless Chromium: the whole journey with the mouse, on the bundled photos.

Create classes by uploading photos (one fish photo planted among the landmarks), train, read the
accuracy, open a confusion-matrix cell, move the planted photo to its class on the Fix step, train again
(features from the cache; the move shows in the counts and in the new run), classify a photo and a
webcam picture, download the model and classify with it through `label_image`, then take a photo for a
class with the webcam. A second tab that starts a training meanwhile gets the "already running" message.
The webcam is Chromium's fake camera (a moving test pattern).

A full-page screenshot of each step is kept in ``$RETRAIN_TEST_ARTIFACTS/ui-screenshots`` (default
``tests/artifacts/ui-screenshots``; the path is printed) and checked non-blank.
Needs Chromium and chromedriver (.ci/install-browser.sh); the real EfficientNet-Lite0, so `slow`.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
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
PER_CLASS = 12
PLANTED = sorted((SAMPLE_PHOTOS / "fish").glob("*.jpg"))[15]  # a fish photo uploaded into landmarks
ARTIFACTS = Path(os.environ.get("RETRAIN_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


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
        tmp_path_factory.mktemp("chromium-profile"), window="1200,1000", downloads=downloads, fake_camera=True
    )
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(pytestconfig):
    folder = ARTIFACTS / "ui-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    yield folder
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nretrain ui screenshots: {folder}", flush=True)


def _shot(browser, shots: Path, name: str) -> Path:
    """A screenshot of the whole page (not only the window), checked to show something."""
    view = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    # a viewport as tall as the page for the shot: everything is laid out and painted, frames included
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": view[0],
            "height": min(max(height, view[1]), 5000),
            "deviceScaleFactor": 1,
            "mobile": False,
        },
    )
    try:
        time.sleep(0.1)
        png = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path = shots / f"{name}.png"
    path.write_bytes(base64.b64decode(png["data"]))
    px = np.asarray(Image.open(path).convert("RGB"))
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3)[::97], axis=0)) > 30, f"{path} looks blank"
    return path


def _photos(folder: str, n: int, skip: int = 0) -> list[Path]:
    return sorted((SAMPLE_PHOTOS / folder).glob("*.jpg"))[skip : skip + n]


def _body(browser, key: str) -> str:
    return browser.find_element(By.TAG_NAME, "body").get_attribute(f"data-{key}") or ""


def _card(browser, name: str):
    return next(
        c
        for c in browser.find_elements(By.CSS_SELECTOR, "#classes .card")
        if c.get_attribute("data-class") == name
    )


def _counts(browser) -> dict[str, int]:
    return {
        c.get_attribute("data-class"): int(c.find_element(By.CSS_SELECTOR, ".count").text)
        for c in browser.find_elements(By.CSS_SELECTOR, "#classes .card")
    }


def _camera_ready(video_id: str):
    return lambda d: d.execute_script(
        f"const v = document.getElementById('{video_id}'); return !!v && v.readyState >= 2 && v.videoWidth > 0"
    )


def test_the_whole_journey(browser, app_url, shots, tmp_path):
    try:
        _journey(browser, app_url, shots, tmp_path)
    except Exception:
        browser.save_screenshot(str(shots / "failure.png"))
        print("page message:", browser.find_element(By.ID, "message").text, file=sys.stderr)
        raise


def _journey(browser, app_url, shots, tmp_path):
    url, project = app_url
    # The page re-renders as it polls: an element found a moment ago may be gone, so look again.
    wait = WebDriverWait(browser, TIMEOUT, ignored_exceptions=(StaleElementReferenceException,))
    t0 = time.monotonic()
    browser.get(url)
    wait.until(lambda d: _body(d, "ready") == "1")
    load_s = time.monotonic() - t0
    assert load_s < 3, f"page usable after {load_s:.2f} s"
    _shot(browser, shots, "01-start")

    # 1. Data: classes created and filled by uploads (one name with HTML in it, shown as text); a fish
    # photo goes into landmarks by mistake
    for name, folder in CLASSES.items():
        browser.find_element(By.ID, "new-class").send_keys(name)
        browser.find_element(By.ID, "add-class").click()
        wait.until(lambda d, n=name: n in _counts(d))
        photos = _photos(folder, PER_CLASS) + ([PLANTED] if folder == "landmarks" else [])
        _card(browser, name).find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
            "\n".join(str(p) for p in photos)
        )
        want = len(photos)
        wait.until(lambda d, n=name, k=want: _counts(d).get(n) == k)
    # bad uploads: a text file named like a photo, and a 1 GB file (sparse: no disk used) refused unsent
    (tmp_path / "notes.jpg").write_text("a shopping list, not a photo")
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(2**30)
    for bad, said in (
        ("notes.jpg", "refused 1: notes.jpg: not an image"),
        ("huge.jpg", "huge.jpg is 1024 MB"),
    ):
        _card(browser, "fish").find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
            str(tmp_path / bad)
        )
        wait.until(lambda d, said=said: said in d.find_element(By.ID, "message").text)
        if bad == "notes.jpg":
            _shot(browser, shots, "02a-not-a-photo")
    assert "nothing was sent" in browser.find_element(By.ID, "message").text
    _shot(browser, shots, "02b-too-large")
    assert _counts(browser)["fish"] == PER_CLASS and not (project / "photos" / "fish" / "notes.jpg").exists()
    names = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#classes .card h4")]
    assert names == sorted(CLASSES)  # the HTML name is its text
    assert not browser.find_elements(By.CSS_SELECTOR, "#classes b")
    assert (project / "photos" / "tools <b>&amp;" / "cat_hammer1.jpg").is_file()
    browser.find_element(By.ID, "check").click()
    wait.until(lambda d: d.find_elements(By.ID, "counts"))
    assert "Ready to train" in browser.find_element(By.ID, "check-result").text
    _card(browser, "fish").find_element(By.XPATH, ".//button[text()='Browse']").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == PER_CLASS)
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#thumbs img')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    _shot(browser, shots, "02-data")

    # 2. Train; a second tab, opened before, that starts a training meanwhile is told one is running
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=train]").click()
    first_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(url)
    wait.until(lambda d: _body(d, "ready") == "1")
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=train]").click()
    second_tab = browser.current_window_handle
    browser.switch_to.window(first_tab)
    steps = browser.find_element(By.NAME, "how_many_training_steps")
    steps.clear()
    steps.send_keys("500")
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: _body(d, "training") == "running")
    browser.switch_to.window(second_tab)
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: "already running" in d.find_element(By.ID, "message").text)
    assert "another tab" in browser.find_element(By.ID, "message").text
    wait.until(lambda d: d.find_element(By.ID, "busy").is_displayed())  # and it follows that training
    _shot(browser, shots, "03-second-tab")
    browser.close()
    browser.switch_to.window(first_tab)
    WebDriverWait(browser, 300).until(lambda d: _body(d, "training") in ("finished", "failed", "cancelled"))
    assert _body(browser, "training") == "finished", browser.find_element(By.ID, "log").text
    assert browser.find_elements(By.CSS_SELECTOR, "#acc-chart polyline")
    first_run = browser.find_element(By.ID, "run-id").text
    _shot(browser, shots, "04-train")

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
    _shot(browser, shots, "05-understand")

    # 4. Fix: the planted fish is suspected, with "fish" suggested; move it there, then train again
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=fix]").click()
    planted = f"landmarks/{PLANTED.name}"
    card_of = f"#fix-body .issue[data-path='{planted}']"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, card_of))
    card = browser.find_element(By.CSS_SELECTOR, card_of)
    assert "suspect" in card.get_attribute("class").split(), card.text
    assert "suspected label error" in browser.find_element(By.ID, "fix-summary").text
    order = [c.get_attribute("data-path") for c in browser.find_elements(By.CSS_SELECTOR, "#fix-body .issue")]
    assert planted in order[:3], order[:5]
    assert card.find_element(By.TAG_NAME, "select").get_attribute("value") == "fish"
    _shot(browser, shots, "06-fix")
    card.find_element(By.XPATH, ".//button[text()='Move']").click()
    wait.until(lambda d: "moved to fish" in d.find_element(By.CSS_SELECTOR, card_of).text)
    assert (project / "photos" / "fish" / PLANTED.name).is_file()
    assert not (project / "photos" / "landmarks" / PLANTED.name).exists()
    wait.until(  # shown from its new place
        lambda d: d.execute_script(
            "const i = document.querySelector(arguments[0] + ' img'); return !!i && i.complete && i.naturalWidth > 0",
            card_of,
        )
    )
    _shot(browser, shots, "07-fixed")
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=data]").click()
    assert _counts(browser) == {"fish": PER_CLASS + 1, "landmarks": PER_CLASS, "tools <b>&amp;": PER_CLASS}
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=train]").click()
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: d.find_element(By.ID, "run-id").text != first_run)
    WebDriverWait(browser, 300).until(
        lambda d: (
            _body(d, "training") in ("finished", "failed", "cancelled")
            and d.find_element(By.ID, "phase").text == _body(d, "training")
        )
    )
    log = browser.find_element(By.ID, "log").text
    assert _body(browser, "training") == "finished", log
    total = 3 * PER_CLASS + 1
    assert f"Bottlenecks: all {total} reused from the cache" in log  # nothing computed again
    _shot(browser, shots, "08-retrained")
    second_run = re.search(r"run (\S+)\)", browser.find_element(By.ID, "run-id").text)[1]
    with open(project / "runs" / second_run / "label_issues.csv", encoding="utf-8", newline="") as f:
        given = {Path(row["path"]).name: row["given_label"] for row in csv.DictReader(f)}
    assert len(given) == total and given[PLANTED.name] == "fish"  # the new run learnt it as a fish

    # 5. Try: a fish photo that was not uploaded, then a picture from the webcam
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=try]").click()
    assert second_run in browser.find_element(By.ID, "try-run").text
    photo = _photos("fish", 1, skip=20)[0]
    browser.find_element(By.ID, "try-file").send_keys(str(photo))
    wait.until(lambda d: _body(d, "tried") == "1")
    assert browser.find_element(By.ID, "top-label").text == "fish"
    assert browser.find_elements(By.CSS_SELECTOR, "#try-result .pred")
    _shot(browser, shots, "09-try")
    browser.find_element(By.ID, "try-cam").click()
    wait.until(_camera_ready("try-video"))
    browser.find_element(By.ID, "try-snap").click()
    wait.until(
        lambda d: (
            _body(d, "tried") == "1"
            and d.find_element(By.CSS_SELECTOR, "#try-result img").get_attribute("alt").startswith("webcam-")
        )
    )
    # the fake camera's test pattern is like none of the classes: most often the answer is "unknown"
    assert browser.find_element(By.ID, "top-label").text in {*CLASSES, "unknown"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#try-result .pred")) == len(CLASSES)
    _shot(browser, shots, "10-try-webcam")
    browser.find_element(By.ID, "try-cam-done").click()
    assert browser.execute_script("return document.getElementById('try-video').srcObject === null")

    # 6. Export: download the model, then classify with label_image
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=export]").click()
    wait.until(lambda d: d.find_elements(By.ID, "download-model"))
    _shot(browser, shots, "11-export")
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

    # 1 again. Data: photos for a class from the webcam, saved into its folder
    browser.find_element(By.CSS_SELECTOR, "nav button[data-go=data]").click()
    _card(browser, "landmarks").find_element(By.XPATH, ".//button[text()='Webcam']").click()
    wait.until(_camera_ready("webcam-video"))
    assert browser.find_element(By.ID, "webcam-class").text == "landmarks"
    for n in (1, 2):
        browser.find_element(By.ID, "webcam-snap").click()
        wait.until(lambda d, n=n: _counts(d)["landmarks"] == PER_CLASS + n)
    assert "2 photo(s) taken" in browser.find_element(By.ID, "webcam-taken").text
    taken = sorted((project / "photos" / "landmarks").glob("webcam-*.jpg"))
    assert len(taken) == 2
    with Image.open(taken[0]) as img:
        assert img.format == "JPEG" and img.width >= 160 and img.height >= 120
    _shot(browser, shots, "12-webcam-photos")
    browser.find_element(By.ID, "webcam-done").click()
    assert not browser.find_element(By.ID, "webcam-box").is_displayed()
    assert browser.execute_script("return document.getElementById('webcam-video').srcObject === null")

    # nothing was fetched from anywhere but the app; every photo is where the journey put it
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(url.rstrip("/")) or u.startswith("blob:") for u in urls), urls
    on_disk = {p.parent.name: 0 for p in (project / "photos").glob("*/*")}
    for p in (project / "photos").glob("*/*"):
        on_disk[p.parent.name] += 1
    assert on_disk == {"fish": PER_CLASS + 1, "landmarks": PER_CLASS + 2, "tools <b>&amp;": PER_CLASS}
