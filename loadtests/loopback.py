"""Loopback servers for the tests and harnesses, without a port race.

Picking a "free" port (bind port 0, read the port, close the socket) and binding it again later races:
in between, another process — a second pytest-xdist worker doing the same — can be handed the same
port, and one of the two servers fails to start or, worse, a test talks to the other worker's server.
These helpers never let go of the port: an in-process server is given the very socket the kernel bound
(``listening_socket`` + ``uvicorn_in_thread``), and a ``loraswap serve`` subprocess binds port 0 itself
and its port is read from uvicorn's start line (``port_from_log``).
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Literal

LOOPBACK = "127.0.0.1"
STARTED = re.compile(r"Uvicorn running on https?://[^\s]+:(?P<port>\d+)")


def listening_socket(host: str = LOOPBACK) -> socket.socket:
    """A TCP socket bound to a port the kernel picked, held until a server takes it over."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def uvicorn_in_thread(
    app: Any, sock: socket.socket, *, name: str, lifespan: Literal["auto", "on", "off"] = "on"
) -> tuple[Any, threading.Thread]:
    """Serve ``app`` on ``sock`` (``listening_socket``) in a daemon thread; uvicorn takes the socket
    over and closes it at shutdown. Returns the ``uvicorn.Server`` (``started``, ``should_exit``) and
    the thread."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan=lifespan)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    return server, thread


def port_from_log(log: Path, proc: subprocess.Popen[Any], timeout_s: float, *, offset: int = 0) -> int:
    """The port a ``loraswap serve --port 0`` subprocess bound: uvicorn's ``Uvicorn running on
    http://HOST:PORT`` line (logged at ``info``, the default level), searched in ``log`` from byte
    ``offset`` (a log appended to across restarts). Raises when the process exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while True:
        with log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        found = STARTED.search(text)
        if found is not None:
            return int(found["port"])
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before listening: {text[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no 'Uvicorn running on' line in {log} within {timeout_s:g} s: {text[-3000:]}"
            )
        time.sleep(0.05)
