"""The console in a real browser: Debian's headless Chromium driven by Selenium through the system
chromedriver (nothing is downloaded at run time: the driver's path is given, so Selenium Manager never
runs). ``.ci/run`` installs ``chromium`` and ``chromium-driver`` when they are missing.

One server and one browser per module. ``LORASWAP_SCREENSHOTS=1`` saves each view to ``docs/images``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from basemodel.settings import Settings
from loadtests.loopback import listening_socket, port_of, uvicorn_in_thread
from service.app import create_app
from tests.service.conftest import RunningServer

ADMIN = "admin-token-" + "a" * 12
GEN = "generate-token-" + "g" * 9
WIDTH, HEIGHT = 1400, 1000
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail(
            "the console tests need Debian's chromium and chromedriver: "
            "apt-get install -y chromium chromium-driver (.ci/run does this)",
            pytrace=False,
        )
    return browser, driver


@pytest.fixture(scope="module")
def console_server(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with both token scopes, its own store, on a loopback port the kernel picked."""
    home = tmp_path_factory.mktemp("console-home")
    sock = listening_socket()
    port = port_of(sock)
    settings = Settings(
        port=port,
        home=home,
        store=str(home / "store"),
        warmup=False,
        admin_tokens=[ADMIN],
        generate_tokens=[GEN],
    )
    app = create_app(settings, loader=lambda _: base_model)
    server, thread = uvicorn_in_thread(app, sock, name="console-server")
    handle = RunningServer(f"http://127.0.0.1:{port}", settings, server, thread)
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    handle.wait_ready()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(browser: Any) -> Callable[[str], None]:
    """``screenshot(name)`` saves docs/images/console-<name>.png when LORASWAP_SCREENSHOTS=1: the whole
    page (the window grows to its height for the shot)."""

    def take(name: str) -> None:
        if os.environ.get("LORASWAP_SCREENSHOTS") != "1":
            return
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        browser.execute_script("window.scrollTo(0, 0)")
        height = int(browser.execute_script("return document.documentElement.scrollHeight"))
        browser.set_window_size(WIDTH, max(HEIGHT, height + 120))  # + the window's own chrome
        try:
            browser.save_screenshot(str(DOCS_IMAGES / f"console-{name}.png"))
        finally:
            browser.set_window_size(WIDTH, HEIGHT)

    return take
