"""A real uvicorn server over loopback per test (sharing one loaded tiny-sd)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.loader import BaseModel, load_base_model
from basemodel.settings import Settings
from loadtests.loopback import listening_socket, port_of, uvicorn_in_thread
from service.app import create_app

# the shared parity checks' asserts report their values as a test module's do
pytest.register_assert_rewrite("tests.service.parity")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; the timeout catches hangs, it is not a speed limit."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def scrape(url: str) -> dict[str, list[Any]]:
    """The server's /metrics samples by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` with these labels."""
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def metric_value(url: str, name: str, **labels: str) -> float:
    return value(scrape(url), name, **labels)


def free_port() -> int:
    """A port that was free a moment ago — racy (another process may take it before it is bound again):
    only for what needs a number up front (Ray Serve). Servers here take ``listening_socket``s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as http:
            while time.monotonic() < deadline:
                if http.get("/readyz").status_code == 200:
                    return
                time.sleep(0.05)
        raise AssertionError("server never became ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def start_server(loraswap_home: Any, base_model: Any) -> Iterator[Callable[..., RunningServer]]:
    """``start_server(loader=None, wait=True, **settings)`` → a running server on a port the kernel picked
    (the bound socket goes to uvicorn: no other pytest-xdist worker can be handed the same port)."""
    running: list[RunningServer] = []

    def start(
        loader: Callable[[Settings], Any] | None = None, wait: bool = True, **overrides: Any
    ) -> RunningServer:
        sock = listening_socket()
        port = port_of(sock)
        settings = Settings(port=port, **{"home": loraswap_home, "warmup": False, **overrides})
        app = create_app(settings, loader=loader or (lambda _: base_model))
        server, thread = uvicorn_in_thread(app, sock, name=f"server-{port}")
        handle = RunningServer(f"http://127.0.0.1:{port}", settings, server, thread)
        running.append(handle)
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if wait:
            handle.wait_ready()
        return handle

    yield start
    for handle in running:
        handle.stop()


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@pytest.fixture
def registry(base_model: Any, tmp_path: Path) -> Registry:
    """An empty local store in ``tmp_path / "store"`` for tiny-sd."""
    return Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))


@pytest.fixture(scope="module")
def flux(loraswap_home: Path) -> BaseModel:
    """tiny-flux-random (Flux.1-dev-shaped, random weights), CPU fp32, once per test module."""
    return load_base_model("tiny-flux-random", loraswap_home / "models", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def sd3(loraswap_home: Path) -> BaseModel:
    """tiny-sd3-random (SD3.5-shaped, random weights), CPU fp32, once per test module."""
    return load_base_model("tiny-sd3-random", loraswap_home / "models", device="cpu", dtype="fp32")
