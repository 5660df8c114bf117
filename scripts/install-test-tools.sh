#!/usr/bin/env sh
# Debian's packages some tests need, installed when missing: chromium and chromedriver (the dashboard's browser
# test, tests/test_dashboard_browser.py), docker-compose 1.29 (tests/test_compose.py validates docker-compose.yml
# with it; no Docker engine is needed) and PostgreSQL (tests/test_cluster.py). Playwright's own browser download
# does not work offline; the distribution's packages do. Needs root or sudo; without either it says so and leaves
# those tests to skip (or to fail under CI=true).
set -eu
packages=
command -v chromium >/dev/null 2>&1 || packages="$packages chromium"
command -v chromedriver >/dev/null 2>&1 || packages="$packages chromium-driver"
command -v docker-compose >/dev/null 2>&1 || packages="$packages docker-compose"
# PostgreSQL's server programs, for the local multi-node test (tests/test_cluster.py); Debian keeps them off PATH.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages="$packages postgresql"
if [ -z "$packages" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=sudo
else
    echo "install-test-tools:$packages missing and neither root nor sudo: the tests that need them cannot run" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: no apt-get here; install$packages yourself" >&2
    exit 0
fi
echo "install-test-tools: installing Debian's$packages (about 40 s for chromium, 16 s for docker-compose, 6 s for postgresql)"
$SUDO apt-get update -qq
# $packages is a space-separated list of package names: split on purpose.
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $packages >/dev/null
