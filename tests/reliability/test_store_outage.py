"""Serving through a dead or slow store: a real server whose S3 store (moto) sits behind the fault proxy.

Regression tests for issue 12's defects 1 (resident adapters refused while the store is down), 2 (a
black-holed store hung requests for 60 s and more) and 7 (an invalid bucket in a source was a 503).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import Store, open_store
from loadtests.faults.proxy import FaultProxy
from tests.adapters.conftest import moto_endpoint, s3_bucket, save_bytes  # noqa: F401 (fixtures)
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.conftest import RunningServer, start_server  # noqa: F401 (fixture)
from tests.service.test_lifecycle import metric_samples, value

STORE_METHODS = {"get", "get_range", "put", "create", "exists", "list", "delete"}
BOUND_S = 15.0  # generous for a loaded machine; the default store deadline is 3 s, the old hang 60 s+


def generate(adapter: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "a", "steps": 1, "seed": 1, "adapters": [adapter]}


@pytest.fixture(scope="module")
def lora_files(base_model: Any) -> list[bytes]:
    tensors = diffusers_layout(make_case(base_model.pipe))
    return [save_bytes({k: v * (1 + i / 4) for k, v in tensors.items()}) for i in range(5)]


class CountingStore:
    """Counts the calls that reach the real store (under the server's circuit breaker)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in STORE_METHODS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


class Outage:
    """A server on an S3 store reached through a fault proxy, plus a direct registry for 'other replicas'."""

    def __init__(self, server: RunningServer, proxy: FaultProxy, registry: Registry) -> None:
        self.server = server
        self.proxy = proxy
        self.registry = registry
        manager = server.server.config.app.state.runtime.adapters
        self.store = CountingStore(manager.registry.store.inner)
        manager.registry.store.inner = self.store

    def http(self, timeout: float = 60) -> httpx.Client:
        return self.server.client(timeout=timeout)


@pytest.fixture
def outage(
    start_server: Callable[..., RunningServer],
    moto_endpoint: str,
    s3_bucket: str,
    base_model: Any,
    tmp_path: Path,
) -> Iterator[Callable[..., Outage]]:
    target = urlparse(moto_endpoint)
    proxies: list[FaultProxy] = []
    uri = f"s3://{s3_bucket}/fleet"
    registry = Registry(
        open_store(uri, s3_endpoint_url=moto_endpoint), BaseIdentity.from_base_model(base_model)
    )

    def start(**settings: Any) -> Outage:
        proxy = FaultProxy((str(target.hostname), int(target.port or 80))).start()
        proxies.append(proxy)
        server = start_server(home=tmp_path, store=uri, s3_endpoint_url=proxy.url, **settings)
        return Outage(server, proxy, registry)

    yield start
    for proxy in proxies:  # heal first, so that nothing the servers still wait for hangs their shutdown
        proxy.set_mode("pass")
    time.sleep(0.2)
    for proxy in proxies:
        proxy.close()


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_resident_adapters_are_served_without_the_store(outage: Any, lora_files: list[bytes]) -> None:
    """Defect 1: pinned ``id@N`` and ``latest`` within its TTL are served while S3 refuses connections,
    with no store call at all; uncached ones fail fast with 503 + Retry-After; /readyz stays 200."""
    env = outage(latest_ttl_s=600, store_breaker_failures=2, store_breaker_cooldown_s=30)
    env.registry.register(lora_files[0], "pinned")
    env.registry.register(lora_files[1], "latest")
    env.registry.register(lora_files[2], "cold")
    with env.http() as http:
        assert http.post("/v1/generate", json=generate({"id": "pinned", "version": 1})).status_code == 200
        assert http.post("/v1/generate", json=generate({"id": "latest"})).status_code == 200
        env.proxy.set_mode("refuse")
        env.store.calls.clear()
        connections = env.proxy.stats.snapshot()["accepted"]
        for _ in range(3):
            pinned = http.post("/v1/generate", json=generate({"id": "pinned", "version": 1}))
            assert pinned.status_code == 200, pinned.text
            latest = http.post("/v1/generate", json=generate({"id": "latest"}))
            assert latest.status_code == 200, latest.text
            assert "x-loraswap-stale" not in latest.headers
            assert "stale" not in latest.json()["adapters"][0]
        assert env.store.calls == Counter()
        assert env.proxy.stats.snapshot()["accepted"] == connections

        cold = [timed(lambda: http.post("/v1/generate", json=generate({"id": "cold"}))) for _ in range(3)]
        for response, seconds in cold:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "adapter_store_error"
            assert int(response.headers["retry-after"]) >= 1
            assert seconds < BOUND_S
        assert cold[-1][0].json()["error"]["detail"]["reason"] == "circuit_open"  # 2 failures opened it
        assert int(cold[-1][0].headers["retry-after"]) == 1  # the background probe is due within 1 s

        ready = http.get("/readyz")
        assert ready.status_code == 200
        store = ready.json()["store"]
        assert (store["state"], store["breaker"]) == ("down", "open")
        assert store["last_error"].startswith("unavailable")
        assert http.post("/v1/generate", json=generate({"id": "pinned", "version": 1})).status_code == 200
    samples = metric_samples(env.server)
    assert value(samples, "loraswap_store_errors_total", operation="list") >= 2
    assert value(samples, "loraswap_store_breaker_state") == 2


def test_black_holed_store_answers_503_within_the_deadline(outage: Any, lora_files: list[bytes]) -> None:
    """Defect 2: with default timeouts, a store that accepts connections and never answers gives 503 +
    Retry-After within the 3 s store deadline (plus slack), not after 60 s; writes are bounded too."""
    env = outage()
    env.registry.register(lora_files[0], "cold")
    env.proxy.set_mode("blackhole")
    with env.http(timeout=40) as http, ThreadPoolExecutor(max_workers=5) as pool:
        checks = {
            "generate": lambda: http.post("/v1/generate", json=generate({"id": "cold"})),
            "list": lambda: http.get("/v1/adapters"),
            "show": lambda: http.get("/v1/adapters/cold"),
            "register": lambda: http.post(
                "/v1/adapters",
                files={"file": ("x.safetensors", lora_files[1], "application/octet-stream")},
                data={"id": "new"},
            ),
            "delete": lambda: http.delete("/v1/adapters/cold"),
        }
        outcomes = dict(zip(checks, pool.map(timed, checks.values()), strict=True))  # all at once
        for name, (response, seconds) in outcomes.items():
            assert response.status_code == 503, (name, response.text)
            assert response.json()["error"]["detail"]["reason"] == "deadline", name
            assert int(response.headers["retry-after"]) >= 1
            assert seconds < BOUND_S, (name, seconds)
        assert http.get("/readyz").status_code == 200


def test_latest_ttl_stale_marker_and_recovery(outage: Any, lora_files: list[bytes]) -> None:
    """``latest`` is re-resolved after its TTL (not per request), served marked stale while the store is
    down, and the first request after the breaker's Retry-After, once the store is back, succeeds."""
    ttl = 3.0  # long enough for a registration between two requests on a loaded machine
    env = outage(latest_ttl_s=ttl, store_breaker_failures=1, store_breaker_cooldown_s=1)
    env.registry.register(lora_files[0], "style")
    env.registry.register(lora_files[1], "cold")
    with env.http() as http:
        assert http.post("/v1/generate", json=generate({"id": "style"})).json()["adapters"][0]["version"] == 1
        resolved = time.monotonic()  # the listing was taken before this
        env.registry.register(lora_files[2], "style")  # another replica registers v2
        env.store.calls.clear()
        within = http.post("/v1/generate", json=generate({"id": "style"}))
        assert within.json()["adapters"][0]["version"] == 1  # within the TTL: no listing, no record read
        assert env.store.calls == Counter()
        time.sleep(max(0.0, resolved + ttl + 0.2 - time.monotonic()))
        after = http.post("/v1/generate", json=generate({"id": "style"}))
        resolved = time.monotonic()
        assert after.json()["adapters"][0]["version"] == 2
        assert env.store.calls == Counter({"list": 1, "get": 2})  # a listing, the new record, its file

        env.proxy.set_mode("refuse")
        time.sleep(max(0.0, resolved + ttl + 0.2 - time.monotonic()))
        stale = http.post("/v1/generate", json=generate({"id": "style"}))
        assert stale.status_code == 200, stale.text
        assert stale.headers["x-loraswap-stale"] == "adapters"
        assert stale.json()["adapters"][0] == {**after.json()["adapters"][0], "stale": True}
        pinned = http.post("/v1/generate", json=generate({"id": "style", "version": 2}))
        assert pinned.status_code == 200 and "x-loraswap-stale" not in pinned.headers

        refused = http.post("/v1/generate", json=generate({"id": "cold"}))
        assert refused.status_code == 503
        env.proxy.set_mode("pass")
        time.sleep(int(refused.headers["retry-after"]))
        back = http.post("/v1/generate", json=generate({"id": "cold"}))
        assert back.status_code == 200, back.text  # the half-open probe let the first request through
        assert http.get("/readyz").json()["store"]["state"] == "ok"


def test_served_within_a_second_of_the_store_coming_back(outage: Any, lora_files: list[bytes]) -> None:
    """Issue 20, item 3: with the default 5 s cool-down, requests that need the store are served again
    within about a second of it coming back (a background probe closes the breaker), and while it is
    down at most one probe a second reaches it."""
    env = outage()
    env.registry.register(lora_files[0], "cold")
    with env.http() as http:
        env.proxy.set_mode("refuse")
        for _ in range(3):  # three failures open the breaker
            assert http.post("/v1/generate", json=generate({"id": "cold"})).status_code == 503
        assert http.get("/readyz").json()["store"]["breaker"] == "open"
        env.store.calls.clear()
        time.sleep(3.0)
        assert 2 <= env.store.calls["exists"] <= 4, env.store.calls  # one probe a second, no more
        assert set(env.store.calls) == {"exists"}, env.store.calls  # and nothing else reached it
        env.proxy.set_mode("pass")
        back = time.monotonic()
        while (response := http.post("/v1/generate", json=generate({"id": "cold"}))).status_code == 503:
            assert time.monotonic() - back < 10, "never recovered"
            time.sleep(0.05)
        recovered = time.monotonic() - back
    assert response.status_code == 200, response.text
    print(f"served {recovered:.2f} s after the store came back")
    assert recovered < 1.5, recovered  # ≤ 1 s probe interval + the request itself, on a loaded machine


def test_changes_through_this_server_apply_at_once(outage: Any, lora_files: list[bytes]) -> None:
    """Registered or deleted through this replica: ``latest`` follows at once despite a long TTL; a
    version deleted elsewhere stops being served once its listing is refreshed (within about a TTL)."""
    env = outage(latest_ttl_s=600)
    env.registry.register(lora_files[0], "style")
    with env.http() as http:
        assert http.post("/v1/generate", json=generate({"id": "style"})).json()["adapters"][0]["version"] == 1
        created = http.post(
            "/v1/adapters",
            files={"file": ("x.safetensors", lora_files[1], "application/octet-stream")},
            data={"id": "style"},
        )
        assert created.status_code == 201, created.text
        assert http.post("/v1/generate", json=generate({"id": "style"})).json()["adapters"][0]["version"] == 2
        assert http.delete("/v1/adapters/style/versions/2").status_code == 200
        assert http.post("/v1/generate", json=generate({"id": "style"})).json()["adapters"][0]["version"] == 1
        gone = http.post("/v1/generate", json=generate({"id": "style", "version": 2}))
        assert gone.status_code == 404


def test_deleted_elsewhere_stops_within_the_ttl(outage: Any, lora_files: list[bytes]) -> None:
    """A held ``id@N`` tombstoned by another replica stops being served once its listing is re-read."""
    env = outage(latest_ttl_s=0.5)
    env.registry.register(lora_files[0], "style")
    with env.http() as http:
        assert http.post("/v1/generate", json=generate({"id": "style", "version": 1})).status_code == 200
        env.registry.delete("style@1")  # another replica deletes it; this server still holds it
        deadline = time.monotonic() + 30
        statuses = []
        while time.monotonic() < deadline:
            statuses.append(
                http.post("/v1/generate", json=generate({"id": "style", "version": 1})).status_code
            )
            if statuses[-1] == 404:
                break
            time.sleep(0.2)
    assert statuses[-1] == 404, statuses


INVALID_SOURCES = [
    "s3://127.0.0.1:43421/x.safetensors",  # the case: host:port where the bucket goes
    "s3://192.168.1.1/x.safetensors",
    "s3://Upper-Case/x.safetensors",
    "s3://a..b/x.safetensors",
    "s3://ab/x.safetensors",
    "s3://xn--bucket/x.safetensors",
    "s3://user@bucket/x.safetensors",
    "s3://bucket/x\nsafetensors",
    "s3://bucket/" + "k" * 1100,
    "s3:///x.safetensors",
]


def test_invalid_source_uri_is_422(
    start_server: Callable[..., RunningServer], tmp_path: Path, moto_endpoint: str
) -> None:
    """Defect 7: a source S3 could never serve is the client's error (422 on ``source``), not a 503."""
    server = start_server(store=str(tmp_path / "store"), s3_endpoint_url=moto_endpoint)
    with server.client() as http:
        for source in INVALID_SOURCES:
            response = http.post("/v1/adapters", json={"id": "x", "source": source})
            assert response.status_code == 422, (source, response.text)
            error = response.json()["error"]
            assert error["type"] == "validation_error"
            assert (error["detail"]["field"], error["detail"]["reason"]) == ("source", "bad_source"), source
