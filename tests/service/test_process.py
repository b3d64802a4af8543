"""The real `loraswap serve` process: CLI client round trip and graceful shutdown on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from loadtests.loopback import port_from_log
from tests.service.conftest import metric_value, wait_until


@pytest.fixture(scope="module")
def serve_process(loraswap_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One `loraswap serve` process for the module (a start is a Python-with-torch start and a model load):
    the CLI round trip runs against it first, then the SIGTERM test, last in the file, stops it."""
    tmp_path = tmp_path_factory.mktemp("serve-process")
    env = {**os.environ, "LORASWAP_HOME": str(loraswap_home), "LORASWAP_WARMUP": "false"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0"],  # its port is in its log
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log_path = tmp_path / "server.log"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 90
    try:
        url = f"http://127.0.0.1:{port_from_log(proc.log_path, proc, 90)}"
    except RuntimeError:
        proc.kill()
        raise
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.log_path.read_text())
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("server did not become ready")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_generate_cli_writes_png(serve_process: Any, tmp_path: Path) -> None:
    _, url = serve_process
    out = tmp_path / "fox.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "generate",
            "a red fox",
            "--server",
            url,
            "--steps",
            "2",
            "--seed",
            "1",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 1" in done.stdout
    assert Image.open(out).size == (32, 32)
    assert "HTTP Request" not in done.stderr and "httpx" not in done.stderr, done.stderr  # a clean bar
    failed = subprocess.run(
        [sys.executable, "-m", "service.cli", "generate", "x", "--server", url, "--steps", "0", "--verbose"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    assert "error[validation_error]" in failed.stderr
    assert "httpx: HTTP Request: POST" in failed.stderr  # --verbose shows the libraries' logs


def test_sigterm_finishes_in_flight_then_exits(serve_process: Any) -> None:  # stops the shared server: last
    proc, url = serve_process
    result: dict[str, Any] = {}

    def slow_request() -> None:
        result["response"] = httpx.post(
            f"{url}/v1/generate", json={"prompt": "a", "steps": 60, "seed": 2}, timeout=300
        )

    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_until(lambda: metric_value(url, "loraswap_generations_in_flight") == 1, "the request to run")
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not _accepting(url), "the server to stop accepting")
    worker.join(300)
    assert result["response"].status_code == 200, proc.log_path.read_text()
    assert proc.wait(60) == 0, proc.log_path.read_text()


def _accepting(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.HTTPError:
        return False
    return True
