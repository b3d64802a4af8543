"""Ray Serve mode end to end: a loopback Ray cluster, 2 replicas of tiny-sd behind the ingress.

One cluster for the module (Ray and two model loads take tens of seconds on 2 cores). Skipped, with the
reason, only where Ray is not installed or cannot start here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import free_port, scrape, value, wait_until

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'loraswap[ray]')")
serve = pytest.importorskip("ray.serve")

from service.ray.cluster import start_ray  # noqa: E402
from service.ray.routing import adapter_set_key, rendezvous_order  # noqa: E402

ROUTED = "loraswap_routing_requests_total"
BODY = {"prompt": "a cat", "steps": 1, "width": 32, "height": 32, "seed": 1}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from service.ray.app import APP_NAME, build_app

    home = tmp_path_factory.mktemp("ray-home")
    try:
        start_ray(num_cpus=4)
    except Exception as exc:  # no shared memory, no ports, a sandbox: say why, never pass silently
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "replicas": 2,
            "home": str(home),
            "base_model": "tiny-sd",
            "device": "cpu",
            "warmup": True,
            "replica_cpus": 1,
            "routing_stats_period_s": 0.2,
            "metrics_push_s": 0.3,
            "latest_ttl_s": 0,
        }
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def adapter_files(fleet: str, count: int, folder: Path) -> list[bytes]:
    from basemodel.tiny import ensure_tiny
    from loadtests.load.adapters import write_adapters

    models = folder / "models"
    ensure_tiny(models)
    return [p.read_bytes() for p in write_adapters(models, count, folder / "files")]


def register(url: str, adapter_id: str, data: bytes) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/v1/adapters",
        files={"file": ("a.safetensors", data, "application/octet-stream")},
        data={"id": adapter_id},
        timeout=120,
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def generate(url: str, adapter: str) -> httpx.Response:
    body = {**BODY, "adapters": [{"id": adapter}]}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120)


def per_replica(samples: dict[str, list[Any]], name: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for sample in samples.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            replica = sample.labels["replica"]
            out[replica] = out.get(replica, 0.0) + sample.value
    return out


def fresh_scrape(url: str, name: str, at_least: float, **labels: str) -> dict[str, list[Any]]:
    """/metrics once the replicas' pushes show ``name`` summing to ``at_least`` (pushes lag a little)."""
    found: dict[str, dict[str, list[Any]]] = {}

    def ready() -> bool:
        found["s"] = scrape(url)
        return value(found["s"], name, **labels) >= at_least

    wait_until(ready, f"{name} {labels} >= {at_least} on /metrics", timeout=60)
    return found["s"]


def test_same_app_behind_the_ingress(fleet: str) -> None:
    """Routes, OpenAPI and error bodies are the app's own."""
    from basemodel.settings import Settings
    from service.app import create_app

    schema = httpx.get(f"{fleet}/schema/openapi.json", timeout=60).json()
    local = create_app(Settings(home=Path("/nonexistent"))).openapi_schema.to_schema()
    assert schema["paths"].keys() == local["paths"].keys()
    assert set(schema["components"]["schemas"]) == set(local["components"]["schemas"])
    assert schema["info"]["title"] == "loraswap"
    bad = httpx.post(f"{fleet}/v1/generate", content=b"{not json", timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "validation_error"
    missing = generate(fleet, "no-such-adapter")
    assert missing.status_code == 404, missing.text
    assert httpx.get(f"{fleet}/readyz", timeout=60).json()["status"] == "ready"
    limit = Settings(home=Path("/nonexistent")).max_body_bytes  # the fleet runs with the default
    too_big = httpx.post(f"{fleet}/v1/generate", content=b"x" * (limit + 1), timeout=60)
    assert too_big.status_code == 413, too_big.text


def test_requests_land_on_the_replica_that_holds_their_adapter(fleet: str, tmp_path: Path) -> None:
    files = adapter_files(fleet, 2, tmp_path)
    ids = ["aff-a", "aff-b"]
    for adapter_id, data in zip(ids, files, strict=True):
        register(fleet, adapter_id, data)
    before = scrape(fleet)
    rounds = 4
    for _ in range(rounds):
        for adapter_id in ids:
            response = generate(fleet, adapter_id)
            assert response.status_code == 200, response.text
    total = value(before, ROUTED) + rounds * len(ids)
    after = fresh_scrape(fleet, ROUTED, total)
    missed = value(after, ROUTED, held="false") - value(before, ROUTED, held="false")
    held = value(after, ROUTED, held="true") - value(before, ROUTED, held="true")
    # one cold load per adapter, every later request on the replica that loaded it
    assert (missed, held) == (len(ids), (rounds - 1) * len(ids))
    replicas = set(per_replica(after, "loraswap_ready"))
    assert len(replicas) == 2, replicas
    # each adapter is device-resident on exactly one replica: its rendezvous home
    resident = per_replica(after, "loraswap_adapter_cache_entries", tier="device")
    assert sum(resident.values()) == len(ids), resident
    homes = {rendezvous_order(adapter_set_key([(i, 1)]) or "", replicas)[0] for i in ids}
    assert {r for r, n in resident.items() if n} == homes


def test_a_version_registered_through_one_replica_is_served_by_the_other(fleet: str, tmp_path: Path) -> None:
    files = adapter_files(fleet, 8, tmp_path)
    replicas = set(per_replica(scrape(fleet), "loraswap_ready"))
    created = "loraswap_adapter_registrations_total"
    for index, data in enumerate(files):
        adapter_id = f"reg-{index}"
        before = scrape(fleet)
        register(fleet, adapter_id, data)
        after = fresh_scrape(fleet, created, value(before, created) + 1)
        grew = per_replica(after, created)
        earlier = per_replica(before, created)
        registrar = next(r for r in replicas if grew.get(r, 0) > earlier.get(r, 0))
        home = rendezvous_order(adapter_set_key([(adapter_id, 1)]) or "", replicas)[0]
        if home == registrar:
            continue  # affinity would send it back to the registrar: try the next one
        served_before = per_replica(after, ROUTED)
        response = generate(fleet, adapter_id)
        assert response.status_code == 200, response.text
        assert response.json()["adapters"][0]["id"] == adapter_id
        served = per_replica(fresh_scrape(fleet, ROUTED, value(after, ROUTED) + 1), ROUTED)
        assert served.get(home, 0) == served_before.get(home, 0) + 1
        assert served.get(registrar, 0) == served_before.get(registrar, 0)
        return
    pytest.fail("every registration landed on its adapter's home replica (1 in 256 by chance)")


def test_zz_shutdown_drains_in_flight_work(fleet: str) -> None:
    """Last in the module: deleting the app lets a running generation finish (200), then stops."""
    from service.ray.app import APP_NAME

    outcome: dict[str, Any] = {}
    body = {**BODY, "steps": 12, "width": 64, "height": 64}

    def slow() -> None:
        try:
            outcome["response"] = httpx.post(f"{fleet}/v1/generate", json=body, timeout=300)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(
        lambda: value(scrape(fleet), "loraswap_generations_in_flight") >= 1, "the generation to start", 60
    )
    started = time.monotonic()
    serve.delete(APP_NAME)  # Serve stops routing, waits for in-flight requests, then stops the replicas
    thread.join(300)
    assert "error" not in outcome, outcome
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.json()["images"], "the drained request returned no image"
    assert time.monotonic() - started < 300
