"""Headless Chromium for the page tests: skips the calling module when it is missing, starts a driver.

Install what it needs with .ci/install-browser.sh (Debian's chromium and chromium-driver; Selenium comes
from the `test` extra). Call :func:`require_browser` at the top of a test module, before importing Selenium.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RETRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = (
    os.environ.get("RETRAIN_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
TIMEOUT = 30  # seconds for a page load or a wait


def require_browser():
    """Selenium's webdriver module; the calling test module is skipped, with the reason, without a browser."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    for what, path in (("Chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (os.path.exists(path) and os.access(path, os.X_OK)):
            pytest.skip(f"no {what} at {path} (run .ci/install-browser.sh)", allow_module_level=True)
    return webdriver


def start_chromium(
    profile: Path,
    *,
    window: str = "1200,1000",
    downloads: Path | None = None,
    console_log: bool = False,
    fake_camera: bool = False,
):
    """A headless Chromium driver that never reaches the network on its own; the caller quits it.

    ``downloads``: where downloads go, without asking. ``console_log``: keep the page's console for
    ``driver.get_log("browser")``. ``fake_camera``: Chromium's fake webcam (a moving test pattern), with
    the permission granted without asking.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={window}",
    ):
        options.add_argument(arg)
    if fake_camera:
        options.add_argument("--use-fake-ui-for-media-stream")
        options.add_argument("--use-fake-device-for-media-stream")
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    # An explicit driver path: Selenium Manager never goes looking for one on the network.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    if downloads is not None:
        driver.execute_cdp_cmd(
            "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
    return driver
