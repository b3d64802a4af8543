"""The ``server`` kill -9 scenario: ``loraswap serve`` SIGKILLed mid-upload, restarted, checked."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from loadtests.faults.crash_kit import (
    ADAPTER_IDS,
    REPO,
    SOURCE_BUCKET,
    SOURCE_KEY,
    START_TIMEOUT_S,
    Tally,
    Target,
)
from loadtests.loopback import port_from_log
from service.uploads import SPOOL_PREFIX, spool_dir

# -- the server scenario --------------------------------------------------------------------------------


def start_server(target: Target, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``loraswap serve`` on a loopback port it picks (``--port 0``, read from its log), once ``/readyz``
    answers 200."""
    offset = log.stat().st_size if log.exists() else 0  # the log is appended to across restarts
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0"],
            cwd=REPO,
            env=target.env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        url = f"http://127.0.0.1:{port_from_log(log, proc, START_TIMEOUT_S, offset=offset)}"
    except RuntimeError:
        proc.kill()
        proc.wait(30)
        raise
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(30)
    raise RuntimeError(f"the server did not become ready in {START_TIMEOUT_S:.0f} s")


class Clients:
    """Three registering clients: multipart, JSON from s3://, and a slow chunked upload."""

    def __init__(self, target: Target, url: str, cycle: int) -> None:
        self.url, self.cycle = url, cycle
        self.data = target.adapter_file.read_bytes()
        self.json_ok = target.endpoint is not None
        self.stop = threading.Event()
        self.mid_upload = threading.Event()
        self.confirmed: dict[str, str] = {}
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(3)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _loop(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            for n in range(10_000):
                if self.stop.is_set():
                    return
                adapter_id, title = ADAPTER_IDS[n % 2], f"server-{self.cycle}-{worker}-{n}"
                try:
                    response = self._send(http, worker, adapter_id, title)
                except httpx.HTTPError:
                    return  # the server is gone
                with self._lock:
                    if response.status_code == 201:
                        body = response.json()
                        self.confirmed[body["ref"]] = body["sha256"]
                    else:
                        self.unexpected.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.05)

    def _send(self, http: httpx.Client, worker: int, adapter_id: str, title: str) -> httpx.Response:
        metadata = json.dumps({"title": title})
        if worker == 0 or (worker == 1 and not self.json_ok):
            files = {"file": ("lora.safetensors", self.data)}
            return http.post("/v1/adapters", files=files, data={"id": adapter_id, "metadata": metadata})
        if worker == 1:
            body = {
                "id": adapter_id,
                "source": f"s3://{SOURCE_BUCKET}/{SOURCE_KEY}",
                "metadata": {"title": title},
            }
            return http.post("/v1/adapters", json=body)
        boundary = f"crash{self.cycle}x{title}"
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        return http.post(
            "/v1/adapters", content=self._slow_body(boundary, adapter_id, metadata), headers=headers
        )

    def _slow_body(self, boundary: str, adapter_id: str, metadata: str) -> Iterator[bytes]:
        def part(name: str, extra: str = "") -> bytes:
            return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()

        yield part("id") + adapter_id.encode() + b"\r\n" + part("metadata") + metadata.encode() + b"\r\n"
        yield part("file", '; filename="lora.safetensors"')
        step = max(1, len(self.data) // 8)
        for start in range(0, len(self.data), step):
            if start:  # the server has had the part's header for a while: its spool file exists
                self.mid_upload.set()
            time.sleep(0.08)
            yield self.data[start : start + step]
        self.mid_upload.clear()
        yield f"\r\n--{boundary}--\r\n".encode()


def server_scenario(target: Target, rng: random.Random, *, kills: int, workdir: Path) -> dict[str, Any]:
    """Start, register over HTTP, SIGKILL mid-upload, restart: ``kills`` times, then stop cleanly."""
    tally = Tally("server", target.name)
    log = workdir / f"server-{target.name}.log"
    spool = spool_dir(target.home)
    proc, url = start_server(target, log)
    for cycle in range(kills + 1):
        if cycle:  # restarted: what the killed server left must be gone
            _check_restart(tally, target, spool)
        with Clients(target, url, cycle) as clients:
            _wait(lambda: bool(clients.confirmed or clients.unexpected), 120, "a first registration")
            if cycle < kills:
                time.sleep(rng.uniform(0.1, 1.2))
                _wait(clients.mid_upload.is_set, 60, "an upload in flight")
                proc.send_signal(signal.SIGKILL)
                proc.wait(60)
                tally.kills += 1
        _tally_clients(tally, clients)
        if cycle < kills:
            spooled = _stale_spool(spool)
            tally.spool_after_kill += spooled
            tally.check(target, after_restart=False, killed={"spool_file": spooled > 0})
            proc, url = start_server(target, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    _check_restart(tally, target, spool)
    return tally.row()


def _check_restart(tally: Tally, target: Target, spool: Path) -> None:
    tally.check(target, after_restart=True)
    left = _stale_spool(spool)
    tally.stray_after_restart += left
    tally.problems += left


def _tally_clients(tally: Tally, clients: Clients) -> None:
    tally.registrations += len(clients.confirmed)
    tally.seen.update(clients.confirmed)
    if clients.unexpected:
        tally.problem_kinds["http_error"] = tally.problem_kinds.get("http_error", 0) + len(clients.unexpected)
        tally.problems += len(clients.unexpected)


def _stale_spool(folder: Path) -> int:
    from adapters.tempfiles import find_temps

    return sum(t.stale for t in find_temps(folder, SPOOL_PREFIX))


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
