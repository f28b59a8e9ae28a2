"""The page at / in a real headless Chromium (Selenium + Debian's chromium-driver), against `retrain serve`.

Install what it needs with .ci/install-browser.sh; without it the tests are skipped.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from browser import TIMEOUT, require_browser, start_chromium
from trained_models import running_server, sample_model, sample_photo

require_browser()  # skips this module, with the reason, without Chromium

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = sample_model(tmp_path_factory)
    with running_server(model.output_graph) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), window="1000,900")
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, server):
    browser.get(f"{server}/")
    wait = WebDriverWait(browser, TIMEOUT)
    wait.until(lambda d: "4 classes" in d.find_element(By.ID, "model").text)
    return wait


def _results(browser) -> list[tuple[str, str, float]]:
    """(file name, top label, width of its bar in %) per result card."""
    out = []
    for card in browser.find_elements(By.CSS_SELECTOR, "#results .result"):
        label = card.find_element(By.CSS_SELECTOR, ".pred .label").text
        width = card.find_element(By.CSS_SELECTOR, ".pred .fill").value_of_css_property("width")
        track = card.find_element(By.CSS_SELECTOR, ".pred .track").value_of_css_property("width")
        out.append((card.get_attribute("data-filename"), label, 100 * float(width[:-2]) / float(track[:-2])))
    return out


def test_choose_a_photo_and_see_its_label(browser, server):
    wait = _open(browser, server)
    photo = sample_photo("fish", 4)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    ((name, label, bar),) = _results(browser)
    assert (name, label) == (photo.name, "fish")
    assert bar > 50  # the top bar is drawn at its probability
    preds = browser.find_elements(By.CSS_SELECTOR, "#results .pred")
    assert len(preds) == 4 and preds[0].find_element(By.CSS_SELECTOR, ".score").text.endswith("%")
    # Nothing was fetched from anywhere but this server.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server) for u in urls), urls


def test_choose_several_photos(browser, server):
    wait = _open(browser, server)
    photos = [sample_photo("tools", 2), sample_photo("animals", 2), sample_photo("landmarks", 5)]
    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in photos))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    assert [(name, label) for name, label, _ in _results(browser)] == [
        (photos[0].name, "tools"),
        (photos[1].name, "animals"),
        (photos[2].name, "landmarks"),
    ]


def test_drop_a_photo(browser, server):
    wait = _open(browser, server)
    data = base64.b64encode(sample_photo("landmarks", 1).read_bytes()).decode()
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        """,
        data,
    )
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    assert [(name, label) for name, label, _ in _results(browser)] == [("dropped.jpg", "landmarks")]


def test_a_file_that_is_not_an_image_shows_the_error(browser, server, tmp_path: Path):
    wait = _open(browser, server)
    bad = tmp_path / "holiday.jpg"
    bad.write_text("this is not a photo")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    message = browser.find_element(By.ID, "status").text
    assert "holiday.jpg" in message and "not an image" in message
    assert _results(browser) == []


def test_a_photo_of_none_of_the_classes_says_so(browser, tmp_path_factory):
    # --unknown_threshold -1000: every photo is "unknown"; the page names the closest class instead of asserting it.
    model = sample_model(tmp_path_factory)
    with running_server(model.output_graph, "--unknown_threshold=-1000") as url:
        wait = _open(browser, url)
        photo = sample_photo("fish", 4)
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        card = browser.find_element(By.CSS_SELECTOR, "#results .result")
        assert card.get_attribute("data-unknown") == "true"
        note = card.find_element(By.CSS_SELECTOR, ".unknown").text
        assert note.startswith("None of the 4 classes") and "it looks most like fish" in note
        assert "unknown score" in note


def test_a_known_photo_has_no_unknown_note(browser, server):
    wait = _open(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(sample_photo("tools", 1)))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    card = browser.find_element(By.CSS_SELECTOR, "#results .result")
    assert card.get_attribute("data-unknown") == "false"
    assert card.find_elements(By.CSS_SELECTOR, ".unknown") == []
