"""Store-outage scenarios: a real server (tiny-sd) whose S3 store (moto) is reached through the fault proxy.

For each fault mode of ``loadtests/faults/proxy.py`` the same questions are asked of the server: is a
pinned ``id@N`` still served, ``latest`` within its TTL, ``latest`` past it (marked stale), what does an
uncached adapter get (503 + ``Retry-After`` within the store deadline), the adapter listing, a
registration — and once the store is back, how long until a request that needs it is served again
(``recovery_s``; within ``RECOVERY_BOUND_S``).

``run(quick)`` returns one row per scenario: ``scenario``, ``mode``, ``requests``, ``outcomes`` (count
per status), ``stale`` (responses marked stale), ``max_latency_s``, ``expect`` and ``ok``. ``main()``
prints them as a table and writes them as JSON (``--out``). Bounded: a fixed number of requests per
scenario, every wait has a limit; ``quick`` (1 request per scenario, refuse/blackhole/reset, a TTL
of 1 s) takes about half a minute on 2 CPU cores, the full run a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.faults.proxy import FaultProxy, Mode
from loadtests.loopback import listening_socket, port_of, uvicorn_in_thread
from loadtests.moto import moto_s3

DEADLINE_SLACK_S = 3.0  # on top of the store deadline, for a loaded machine
RECOVERY_BOUND_S = 1.5  # the 1 s probe interval + the first request's own store reads, loaded machine
RECOVERY_GIVE_UP_S = 30.0
BUCKET = "loraswap-faults"
STORE_PREFIX = "fleet"


@dataclass(frozen=True)
class Plan:
    quick: bool
    requests: int
    modes: tuple[tuple[Mode, dict[str, Any]], ...]
    settings: dict[str, Any]

    @classmethod
    def make(cls, quick: bool) -> Plan:
        modes: list[tuple[Mode, dict[str, Any]]] = [("refuse", {}), ("blackhole", {})]
        if not quick:
            modes.append(("delay", {"delay_ms": 4000}))  # slower than the store deadline
        modes.append(("reset", {"reset_after": 64 << 10}))  # cut inside the adapter file
        settings: dict[str, Any] = {"latest_ttl_s": 1.0} if quick else {}
        return cls(quick, 1 if quick else 5, tuple(modes), settings)


@dataclass
class Row:
    scenario: str
    mode: str
    expect: str
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stale: int = 0
    ok: bool = True
    note: str = ""
    recovery_s: float | None = None

    def record(self, response: httpx.Response, seconds: float) -> httpx.Response:
        self.statuses.append(response.status_code)
        self.latencies.append(seconds)
        self.stale += response.headers.get("x-loraswap-stale") == "adapters"
        return response

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "requests": len(self.statuses),
            "outcomes": {str(k): v for k, v in sorted(Counter(self.statuses).items())},
            "stale": self.stale,
            "max_latency_s": round(max(self.latencies, default=0.0), 3),
            "expect": self.expect,
            "ok": self.ok,
            "note": self.note,
            **({} if self.recovery_s is None else {"recovery_s": self.recovery_s}),
        }


# -- the environment ------------------------------------------------------------------------------------


def adapter_files(base: Any, count: int, folder: Path) -> list[bytes]:
    """``count`` distinct LoRA files for the base model's UNet (PEFT layout, seeded values)."""
    import torch

    from loadtests.bench_swap.fixtures import peft_layout, write_adapter_files

    paths = write_adapter_files(peft_layout(base.pipe.unet, rank=4), count, torch.float32, folder)
    return [p.read_bytes() for p in paths]


@dataclass
class Server:
    url: str
    server: Any
    thread: threading.Thread
    app: Any

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(settings: Any, loader: Callable[[Any], Any] | None, sock: socket.socket) -> Server:
    """The app on ``sock`` (``listening_socket``, whose port ``settings.port`` names) once ready."""
    from service.app import create_app

    app = create_app(settings, loader=loader)
    server, thread = uvicorn_in_thread(app, sock, name="outage-server")
    url = f"http://127.0.0.1:{port_of(sock)}"
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if http.get("/readyz").status_code == 200:
                    return Server(url, server, thread, app)
            time.sleep(0.1)
    server.should_exit = True
    raise RuntimeError("the server did not become ready within 300 s")


# -- the scenarios ----------------------------------------------------------------------------------------


class Scenarios:
    def __init__(self, http: httpx.Client, proxy: FaultProxy, plan: Plan, files: list[bytes], settings: Any):
        self.http = http
        self.proxy = proxy
        self.plan = plan
        self.files = files
        self.ttl_s = float(settings.latest_ttl_s)
        self.bound_s = float(settings.store_deadline_s) + DEADLINE_SLACK_S
        self.rows: list[Row] = []

    def timed(self, row: Row, call: Callable[[], httpx.Response]) -> httpx.Response:
        started = time.monotonic()
        response = call()
        return row.record(response, time.monotonic() - started)

    def generate(self, adapter: dict[str, Any]) -> httpx.Response:
        return self.http.post(
            "/v1/generate", json={"prompt": "a", "steps": 1, "seed": 1, "adapters": [adapter]}
        )

    def register(self, adapter_id: str, data: bytes) -> httpx.Response:
        files = {"file": ("lora.safetensors", data, "application/octet-stream")}
        return self.http.post("/v1/adapters", files=files, data={"id": adapter_id})

    def row(self, scenario: str, mode: str, expect: str) -> Row:
        row = Row(scenario, mode, expect)
        self.rows.append(row)
        return row

    def served(self, row: Row, *, stale: bool | None) -> None:
        row.ok = bool(row.statuses) and all(s == 200 for s in row.statuses)
        if stale is not None:
            row.ok &= row.stale == (len(row.statuses) if stale else 0)

    def refused_fast(self, row: Row, response: httpx.Response | None = None) -> None:
        row.ok = bool(row.statuses) and all(s == 503 for s in row.statuses)
        row.ok &= max(row.latencies) <= self.bound_s
        if response is not None:
            row.ok &= int(response.headers.get("retry-after", "0")) >= 1

    def outage(self, mode: Mode, options: dict[str, Any], cold: int) -> None:
        """One fault mode: warm up in 'pass', break the store, ask everything, heal, check recovery."""
        cold_id, new_id = f"cold-{mode}", f"new-{mode}"
        self.proxy.set_mode("pass")
        assert self.register(cold_id, self.files[cold]).status_code in (200, 201)
        assert self.generate({"id": "latest"}).status_code == 200  # a fresh resolution of latest
        self.proxy.set_mode(mode, **options)
        label = mode if not options else f"{mode} {','.join(f'{k}={v}' for k, v in options.items())}"
        n = self.plan.requests

        row = self.row("latest within TTL", label, "200, not stale")
        self.timed(row, lambda: self.generate({"id": "latest"}))
        self.served(row, stale=False)

        row = self.row("pinned id@N", label, "200, no store call")
        before = self.proxy.stats.snapshot()["accepted"]
        for _ in range(n):
            self.timed(row, lambda: self.generate({"id": "pinned", "version": 1}))
        self.served(row, stale=False)
        if mode == "refuse":  # every store call would open a connection: count them
            opened = self.proxy.stats.snapshot()["accepted"] - before
            row.ok &= opened == 0
            row.note = f"{opened} store connections"

        time.sleep(self.ttl_s + 0.2)
        stale = self.row("latest past TTL", label, "200, X-Loraswap-Stale")
        cold_row = self.row("uncached adapter", label, f"503 + Retry-After within {self.bound_s:g} s")
        calls: list[tuple[Row, Callable[[], httpx.Response], int]] = [
            (stale, lambda: self.generate({"id": "latest"}), n),
            (cold_row, lambda: self.generate({"id": cold_id}), n),
        ]
        if mode != "reset":  # a reset cuts long responses only: listings and registrations pass
            listing = self.row("GET /v1/adapters", label, f"503 within {self.bound_s:g} s")
            registration = self.row("registration", label, f"503 within {self.bound_s:g} s")
            calls += [
                (listing, lambda: self.http.get("/v1/adapters"), n),
                (registration, lambda: self.register(new_id, self.files[cold + 1]), 1),
            ]
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:  # concurrently: each waits its deadline
            last = [f.result() for f in [pool.submit(self.repeat, *job) for job in calls]]
        self.served(stale, stale=mode != "reset")
        if mode == "reset":
            stale.note = "listings pass (small): nothing stale"
        self.refused_fast(cold_row, last[1])
        cold_row.note = f"reason {last[1].json().get('error', {}).get('detail', {}).get('reason')}"
        for row in (r for r, _, _ in calls[2:]):
            self.refused_fast(row)
        self.recovery(label, cold_id, last[1])

    def repeat(self, row: Row, call: Callable[[], httpx.Response], times: int) -> httpx.Response:
        responses = [self.timed(row, call) for _ in range(times)]
        return responses[-1]

    def recovery(self, label: str, cold_id: str, last: httpx.Response) -> None:
        """Heal the store, then ask every 50 ms until a request that needs it succeeds: the recovery
        time, which the background probe keeps within about its 1 s interval."""
        self.proxy.set_mode("pass")
        healed = time.monotonic()
        row = self.row("first request after recovery", label, f"200 within {RECOVERY_BOUND_S:g} s")
        refused = 0
        while (response := self.generate({"id": cold_id})).status_code == 503:
            refused += 1
            if time.monotonic() - healed > RECOVERY_GIVE_UP_S:
                break
            time.sleep(0.05)
        recovered = time.monotonic() - healed
        row.record(response, recovered)
        row.recovery_s = round(recovered, 3)
        self.served(row, stale=None)
        row.ok &= recovered <= RECOVERY_BOUND_S
        row.note = (
            f"200 {recovered:.2f} s after the store came back ({refused} × 503 before; the last "
            f"outage answer had Retry-After {last.headers.get('retry-after', '?')})"
        )


def run(
    quick: bool,
    *,
    base: Any | None = None,
    home: Path | None = None,
    settings_overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every scenario of every fault mode against one server; one row per scenario.

    ``base`` is the loaded base model to serve (tests pass their tiny-sd); by default ``tiny-sd`` is
    installed and loaded on CPU under ``home`` (a temporary folder unless given).
    """
    from adapters.identity import BaseIdentity
    from adapters.registry import Registry
    from adapters.sources import open_store
    from basemodel.loader import load_base_model
    from basemodel.settings import Settings

    plan = Plan.make(quick)
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraswap-outage-")))
        if base is None:
            base = load_base_model("tiny-sd", home / "models", device="cpu", dtype="fp32")
        model = base
        endpoint = stack.enter_context(moto_s3())
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        uri = f"s3://{BUCKET}/{STORE_PREFIX}"
        files = adapter_files(base, 3 + 2 * len(plan.modes), home / "lora-files")
        registry = Registry(open_store(uri, s3_endpoint_url=endpoint), BaseIdentity.from_base_model(base))
        registry.register(files[0], "pinned")
        registry.register(files[1], "latest")
        host, port = endpoint.removeprefix("http://").split(":")
        proxy = stack.enter_context(FaultProxy((host, int(port))))
        sock = listening_socket()
        stack.callback(sock.close)  # uvicorn closes it first when it ran; a no-op then
        settings = Settings(
            home=home,
            port=port_of(sock),
            warmup=False,
            device="cpu",
            store=uri,
            s3_endpoint_url=proxy.url,
            pinned_adapters=["pinned@1"],
            **{**plan.settings, **(settings_overrides or {})},
        )
        server = start_server(settings, lambda _settings: model, sock)
        stack.callback(server.stop)
        stack.callback(proxy.set_mode, "pass")  # runs first: nothing hangs the server's shutdown
        http = stack.enter_context(httpx.Client(base_url=server.url, timeout=120))
        scenarios = Scenarios(http, proxy, plan, files, settings)
        for index, (mode, options) in enumerate(plan.modes):
            scenarios.outage(mode, options, cold=2 + 2 * index)
        return [row.to_dict() for row in scenarios.rows]


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("scenario", "mode", "n", "outcomes", "stale", "max s", "ok", "note")
    lines = [
        (
            r["scenario"],
            r["mode"],
            str(r["requests"]),
            " ".join(f"{k}×{v}" for k, v in r["outcomes"].items()),
            str(r["stale"]),
            f"{r['max_latency_s']:.2f}",
            "yes" if r["ok"] else "NO",
            r["note"],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    render = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *lines]]
    render.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(render)


def recovery_summary(rows: Sequence[dict[str, Any]]) -> str:
    times = {r["mode"]: r["recovery_s"] for r in rows if r.get("recovery_s") is not None}
    if not times:
        return "not measured"
    return f"max {max(times.values()):.2f} s (" + ", ".join(f"{m} {t:.2f} s" for m, t in times.items()) + ")"


def quiet_logs() -> None:
    """Warnings and up only: the server and its clients log a line per request otherwise."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("httpx", "werkzeug", "adapters.registry", "service", "basemodel"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 request per scenario, short TTL/cool-down")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    quiet_logs()
    started = time.monotonic()
    rows = run(args.quick)
    print(table(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows)} scenarios in {time.monotonic() - started:.1f} s; {failed} not ok")
    print(f"recovery after the store came back: {recovery_summary(rows)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {"suite": "faults.outage", "quick": args.quick, "rows": rows}
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
