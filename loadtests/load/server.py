"""The server under load: a real ``loraswap serve`` subprocess on 127.0.0.1, and its memory over time
(its RSS and, when it runs on CUDA, its allocated CUDA memory as ``/metrics`` reports it).

``ServerProcess`` is a context manager that always ends the process (SIGTERM, then SIGKILL), on a normal
exit, an exception or Ctrl-C; an ``atexit`` hook covers an interpreter exit on the way. The server runs in
its own session, so a Ctrl-C in the terminal reaches only the harness, which then stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests.loopback import port_from_log

LOOPBACK = "127.0.0.1"
CUDA_ALLOCATED = "loraswap_cuda_memory_allocated_bytes"

Probe = Callable[[], float | None]  # one memory figure in KiB, or None when it cannot be read now


@dataclass(frozen=True)
class ServerOptions:
    home: Path  # LORASWAP_HOME, with tiny-sd installed under models/
    max_queue: int
    device_cache_mb: int
    request_timeout_s: float
    threads: int | None  # OMP_NUM_THREADS for the server (None: inherit)
    env: dict[str, str] = field(default_factory=dict)  # further LORASWAP_* settings


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
        self.port: int | None = None  # the server binds port 0; its port is read in wait_ready
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "the server's port is known once wait_ready returned"
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def command(self) -> list[str]:
        o = self.options
        return [
            sys.executable, "-m", "service.cli", "serve", "--host", LOOPBACK, "--port", "0",
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
        if self.port is None:
            assert self.proc is not None, "the server is not running"
            try:
                self.port = port_from_log(self.log_path, self.proc, timeout_s)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
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


def scrape(text: str) -> dict[str, Any]:
    """The counters and gauges the report uses, from the Prometheus text of ``/metrics``."""
    errors: dict[str, float] = {}
    gauges: dict[str, float] = {}
    loads: dict[str, float] = {}
    images = math.nan
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraswap_errors_total":
                errors[sample.labels["type"]] = sample.value
            elif sample.name == "loraswap_images_generated_total":
                images = sample.value
            elif sample.name == "loraswap_adapter_load_seconds_count":
                loads[sample.labels["source"]] = sample.value
            elif family.type == "gauge" and not sample.labels:
                gauges[sample.name] = sample.value
    return {"errors": errors, "images": images, "gauges": gauges, "adapter_loads": loads}


def cuda_allocated_kib(metrics_text: str) -> float | None:
    """The server's allocated CUDA memory (KiB) from its ``/metrics`` text; ``None`` off CUDA (the
    gauge is absent there)."""
    allocated = scrape(metrics_text)["gauges"].get(CUDA_ALLOCATED)
    return None if allocated is None else allocated / 1024


def scraped_cuda_allocated_kib(url: str) -> float | None:
    try:
        return cuda_allocated_kib(httpx.get(f"{url}/metrics", timeout=10).text)
    except httpx.HTTPError:
        return None


def memory_probes(pid: int, url: str) -> dict[str, Probe]:
    """What to sample: the process's RSS, and its allocated CUDA memory if ``/metrics`` has the gauge
    (the server runs on CUDA; ask once it is ready, since the gauge appears with the loaded model)."""
    probes: dict[str, Probe] = {"rss": lambda: rss_kib(pid)}
    if scraped_cuda_allocated_kib(url) is not None:
        probes["cuda_allocated"] = lambda: scraped_cuda_allocated_kib(url)
    return probes


class MemorySampler:
    """Reads every probe each ``interval_s`` on a daemon thread: ``samples[name]`` = (wall time, KiB)."""

    def __init__(self, probes: dict[str, Probe], interval_s: float) -> None:
        self.probes = probes
        self.interval_s = interval_s
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in probes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 15)  # a scrape may take up to its 10 s timeout

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, probe in self.probes.items():
                value = probe()
                if value is not None:
                    self.samples[name].append((time.time(), value))
            self._stop.wait(self.interval_s)
