"""The TCP fault proxy of the fault suite, against a small echo server on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from loadtests.faults.proxy import FaultProxy

PAYLOAD = b"x" * 100_000


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """Answers every chunk it reads with the same bytes."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets connections on purpose
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[:2]
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(echo) as running:
        yield running


def connect(proxy: FaultProxy, timeout: float = 5) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, PAYLOAD) == PAYLOAD
    deadline = time.monotonic() + 10  # the proxy counts a chunk just after sending it on
    while proxy.stats.snapshot()["from_target"] < len(PAYLOAD) and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = proxy.stats.snapshot()
    assert stats["accepted"] == 1
    assert stats["to_target"] == stats["from_target"] == len(PAYLOAD)


def test_refuse_resets_new_and_open_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as open_one:
        assert roundtrip(open_one, b"hi") == b"hi"
        proxy.set_mode("refuse")
        time.sleep(0.3)  # the open connection notices within a tick
        with pytest.raises(OSError):
            open_one.sendall(b"again")
            if not open_one.recv(10):
                raise ConnectionResetError("closed")
    with pytest.raises(OSError), connect(proxy) as sock:  # the reset may already fail the connect
        sock.sendall(b"hello")
        if not sock.recv(10):
            raise ConnectionResetError("closed")
    assert proxy.stats.snapshot()["refused"] == 1


def test_blackhole_never_answers_then_heals(proxy: FaultProxy) -> None:
    proxy.set_mode("blackhole")
    with connect(proxy, timeout=0.5) as sock:  # the connection itself is accepted
        sock.sendall(b"ping")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.set_mode("pass")  # like a healed partition: the held bytes flow again
        sock.settimeout(5)
        assert sock.recv(10) == b"ping"


def test_delay_slows_every_chunk(proxy: FaultProxy) -> None:
    proxy.set_mode("delay", delay_ms=200)
    with connect(proxy) as sock:
        started = time.monotonic()
        assert roundtrip(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 0.35  # once each way


def test_reset_cuts_a_response_after_n_bytes(proxy: FaultProxy) -> None:
    proxy.set_mode("reset", reset_after=1000)
    received = b""
    with connect(proxy) as sock:
        sock.sendall(PAYLOAD)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    assert len(received) == 1000
    assert proxy.stats.snapshot()["resets"] == 1


def test_unknown_mode_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set_mode("slow")  # type: ignore[arg-type]
