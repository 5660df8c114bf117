"""Driving the dashboard as a person would: `dynastudy dashboard` in its own process group on loopback, and
Debian's chromium (headless, through chromedriver and selenium) with a fresh profile. Both are stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--window-size=1400,1000"]


def browser_paths() -> tuple[str, str]:
    """chromium and chromedriver, or skip (fail under CI=true): `make tools` installs them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "chromium and chromedriver are not installed (`make tools` installs Debian's)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def artifacts_dir() -> Path:
    """Where the browser test leaves its screenshots (DYNASTUDY_TEST_ARTIFACTS, else test-artifacts/)."""
    path = Path(os.environ.get("DYNASTUDY_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard(args: list[str], env: dict[str, str], log: Path, timeout: float = 120):
    """`dynastudy dashboard ARGS` until the block ends; yields its URL once it answers."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "study.cli", "dashboard", "--host", "127.0.0.1", "--port",
                                 str(port), *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the dashboard exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"the dashboard did not answer within {timeout} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromedriver and the browser it started
