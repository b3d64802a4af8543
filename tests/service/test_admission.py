"""Admission under overload: a full queue refuses (429) before the request resolves or loads adapters."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from loadtests.load.adapters import register_adapters, write_adapters
from tests.service.conftest import scrape, value, wait_until

QUICK = {"prompt": "a red circle", "steps": 2, "seed": 1}


def gauges_and_loads(url: str) -> tuple[dict[str, float], float]:
    """The queue gauges, and how many adapter loads the cache has done (any source)."""
    samples = scrape(url)
    gauges = {
        name: value(samples, name) for name in ("loraswap_generations_in_flight", "loraswap_queue_depth")
    }
    return gauges, value(samples, "loraswap_adapter_load_seconds_count")


def test_full_queue_refuses_before_any_adapter_work(
    start_server: Any, loraswap_home: Path, tmp_path: Path
) -> None:
    server = start_server(max_queue=1)
    runtime = server.server.config.app.state.runtime
    gate = threading.Event()
    run_batch = runtime.worker._run

    def gated(jobs: list[Any]) -> list[Any]:  # hold the worker until the probes are done
        gate.wait(120)
        return run_batch(jobs)

    runtime.worker._run = gated
    ids = register_adapters(server.url, write_adapters(loraswap_home / "models", 1, tmp_path / "files"))
    responses: list[httpx.Response] = []

    def occupy() -> None:
        with server.client() as http:
            responses.append(http.post("/v1/generate", json=QUICK))

    def queue_is(running: int, waiting: int) -> bool:
        gauges = gauges_and_loads(server.url)[0]
        return (
            gauges["loraswap_generations_in_flight"] == running and gauges["loraswap_queue_depth"] == waiting
        )

    # One running, then one queued: started together, the second could find the first still queued and
    # be refused itself (max_queue 1).
    blockers = [threading.Thread(target=occupy) for _ in range(2)]
    try:
        blockers[0].start()
        wait_until(lambda: queue_is(1, 0), "the first request to run")
        blockers[1].start()
        wait_until(lambda: queue_is(1, 1), "the second request to wait in the queue")
        with server.client() as http:
            loads_before = gauges_and_loads(server.url)[1]
            registered = http.post("/v1/generate", json={**QUICK, "adapters": [{"id": ids[0]}]})
            unknown = http.post("/v1/generate", json={**QUICK, "adapters": [{"id": "never-registered"}]})
            invalid = http.post("/v1/generate", json={**QUICK, "steps": 0})
            loads_after = gauges_and_loads(server.url)[1]
    finally:
        gate.set()
        for blocker in blockers:
            blocker.join(120)
    for refused in (registered, unknown):
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
    assert loads_after == loads_before  # the refused request loaded nothing into the cache
    assert invalid.status_code == 422  # invalid input is still 422 under overload
    assert sorted(r.status_code for r in responses) == [200, 200]
