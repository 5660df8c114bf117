#!/usr/bin/env sh
# Debian's chromium and chromedriver, for the dashboard's browser test (tests/test_dashboard_browser.py).
# Playwright's own browser download does not work offline; the distribution's packages do. Needs root or sudo;
# without either it says so and leaves the test to skip (or to fail under CI=true).
set -eu
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=sudo
else
    echo "install-browser: chromium/chromedriver missing and neither root nor sudo: the browser test cannot run" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; install chromium and chromedriver yourself" >&2
    exit 0
fi
echo "install-browser: installing Debian's chromium and chromium-driver (about 40 s)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
