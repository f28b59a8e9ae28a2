#!/usr/bin/env bash
# What tests/test_serve_browser.py needs: Debian's Chromium and its matching chromedriver (the Selenium
# package comes from the `test` extra). Run as root or with sudo available; safe to run again.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium and chromedriver already installed: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -q chromium chromium-driver
/usr/bin/chromium --version
