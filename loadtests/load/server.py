"""The server under load: a real ``loraswap serve`` subprocess on 127.0.0.1, and its RSS over time.

``ServerProcess`` is a context manager that always ends the process (SIGTERM, then SIGKILL), on a normal
exit, an exception or Ctrl-C; an ``atexit`` hook covers an interpreter exit on the way. The server runs in
its own session, so a Ctrl-C in the terminal reaches only the harness, which then stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerOptions:
    home: Path  # LORASWAP_HOME, with tiny-sd installed under models/
    max_queue: int
    device_cache_mb: int
    request_timeout_s: float
    threads: int | None  # OMP_NUM_THREADS for the server (None: inherit)
    env: dict[str, str] = field(default_factory=dict)  # further LORASWAP_* settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def server_env(options: ServerOptions) -> dict[str, str]:
    """The harness's environment without inherited ``LORASWAP_*`` settings (tokens would turn auth on),
    plus the run's own: offline, the device-cache budget, the thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["LORASWAP_ADAPTER_CACHE_DEVICE_MB"] = str(options.device_cache_mb)
    if options.threads is not None:
        env["OMP_NUM_THREADS"] = str(options.threads)
    env.update(options.env)
    return env


class ServerProcess:
    def __init__(self, options: ServerOptions, log_path: Path) -> None:
        self.options = options
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        o = self.options
        return [
            sys.executable, "-m", "service.cli", "serve", "--host", LOOPBACK, "--port", str(self.port),
            "--home", str(o.home), "--max-queue", str(o.max_queue),
            "--request-timeout", str(o.request_timeout_s),
        ]  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=server_env(self.options),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        atexit.unregister(self.stop)

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until ``/readyz`` answered 200; raises with the log's tail if it died or never did."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                raise RuntimeError(f"the server exited during start-up:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (the server drains and exits), SIGKILL after ``grace_s``; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def rss_kib(self) -> int | None:
        return rss_kib(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def rss_kib(pid: int) -> int | None:
    """``VmRSS`` of a live process, from ``/proc/PID/status`` (KiB); ``None`` once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval_s`` on a daemon thread: ``samples`` = (wall time, KiB)."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = rss_kib(self.pid)
            if kib is not None:
                self.samples.append((time.time(), kib))
            self._stop.wait(self.interval_s)
