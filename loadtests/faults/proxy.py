"""A TCP fault proxy: listens on 127.0.0.1, forwards to a target, with faults switchable at run time.

Modes (``FaultProxy.set_mode``), applied to new connections and to open ones within ~50 ms:

- ``pass``: forward both ways.
- ``refuse``: reset (RST) every connection at accept, and the open ones.
- ``blackhole``: accept, take the bytes, never answer (nothing is forwarded either way); like a
  network partition, the bytes flow again when the mode goes back to ``pass``.
- ``delay``: forward, sleeping ``delay_ms`` before every chunk (either direction).
- ``reset``: forward, but reset a connection once the target sent ``reset_after`` bytes on it (a
  response cut mid-body).

Threads, not asyncio: a thread per connection and one ``select`` loop in it, so the proxy runs beside
any event loop (uvicorn's, the client's) without sharing one. Loopback only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole", "delay", "reset"]
MODES: tuple[Mode, ...] = ("pass", "refuse", "blackhole", "delay", "reset")
CHUNK = 64 << 10
TICK_S = 0.05


@dataclass(frozen=True)
class Fault:
    mode: Mode = "pass"
    delay_ms: float = 0.0
    reset_after: int = 0


@dataclass
class ProxyStats:
    accepted: int = 0  # connections accepted (each store call attempt opens one unless kept alive)
    refused: int = 0  # connections reset at accept
    resets: int = 0  # open connections reset (refuse, or reset after N bytes)
    to_target: int = 0  # bytes forwarded client → target
    from_target: int = 0  # bytes forwarded target → client
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                k: getattr(self, k) for k in ("accepted", "refused", "resets", "to_target", "from_target")
            }


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.fault = Fault()
        self.stats = ProxyStats()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(TICK_S * 4)
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._accepting.start()
        return self

    def set_mode(self, mode: Mode, *, delay_ms: float = 0.0, reset_after: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; one of {', '.join(MODES)}")
        self.fault = Fault(mode, delay_ms, reset_after)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._accepting.join(5)
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.stats.add("accepted")
            if self.fault.mode == "refuse":
                self.stats.add("refused")
                reset(client)
                continue
            thread = threading.Thread(target=self._serve, args=(client,), name="fault-conn", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        link = _Link(client)
        abrupt = True
        try:
            while not self._closing.is_set():
                fault = self.fault
                if fault.mode == "refuse":
                    self.stats.add("resets")
                    return
                if fault.mode == "blackhole":  # hold everything; the kernel keeps the client's bytes
                    time.sleep(TICK_S)
                    continue
                if link.upstream is None:
                    link.upstream = socket.create_connection(self.target, timeout=5)
                    link.upstream.settimeout(None)
                if not self._pump(link, fault):
                    abrupt = fault.mode == "reset" and link.cut
                    return
        except OSError:
            return
        finally:
            link.close(abrupt=abrupt)

    def _pump(self, link: _Link, fault: Fault) -> bool:
        """Forward what is readable now; False once the connection is over."""
        assert link.upstream is not None
        readable, _, _ = select.select([link.client, link.upstream], [], [], TICK_S)
        for source in readable:
            data = source.recv(CHUNK)
            if not data:
                return False
            if fault.mode == "delay" and fault.delay_ms > 0:
                time.sleep(fault.delay_ms / 1000)
            if source is link.client:
                link.upstream.sendall(data)
                self.stats.add("to_target", len(data))
                continue
            if fault.mode == "reset" and link.from_target + len(data) >= fault.reset_after:
                allowed = max(0, fault.reset_after - link.from_target)
                link.client.sendall(data[:allowed])
                self.stats.add("from_target", allowed)
                self.stats.add("resets")
                link.cut = True
                return False
            link.client.sendall(data)
            link.from_target += len(data)
            self.stats.add("from_target", len(data))
        return True


@dataclass
class _Link:
    """One proxied connection."""

    client: socket.socket
    upstream: socket.socket | None = None
    from_target: int = 0
    cut: bool = False

    def close(self, *, abrupt: bool) -> None:
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if abrupt:
                reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
