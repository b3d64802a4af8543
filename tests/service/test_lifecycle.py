"""Queueing (429), timeouts (504), readiness, client disconnects and metrics."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.service.conftest import metric_value, scrape, value, wait_until

SLOW = {"prompt": "a slow fox", "steps": 60, "seed": 1}


def metric_samples(server: Any) -> dict[str, list[Any]]:
    return scrape(server.url)


def test_full_queue_answers_429_with_retry_after(start_server: Any) -> None:
    server = start_server(max_queue=1)

    def post(_: int) -> httpx.Response:
        with server.client() as http:
            return http.post("/v1/generate", json=SLOW)

    with ThreadPoolExecutor(max_workers=5) as pool:
        responses = list(pool.map(post, range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, statuses
    for response in rejected:
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "overloaded"


def test_request_timeout_is_504(start_server: Any) -> None:
    server = start_server(request_timeout_s=0.3)
    with server.client() as http:
        response = http.post("/v1/generate", json={**SLOW, "steps": 150})
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout"


def test_readiness_follows_loading(start_server: Any, base_model: Any) -> None:
    release = threading.Event()

    def slow_loader(_: Any) -> Any:
        release.wait(30)
        return base_model

    server = start_server(loader=slow_loader, wait=False, warmup=True)
    with server.client() as http:
        assert http.get("/healthz").status_code == 200
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["status"] in {"starting", "loading"}
        refused = http.post("/v1/generate", json={"prompt": "a", "steps": 1})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "not_ready"
        assert refused.headers["retry-after"]
        release.set()
    server.wait_ready()
    with server.client() as http:
        ready = http.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["model"]["name"] == "tiny-sd"


def test_failed_load_is_reported(start_server: Any) -> None:
    def broken_loader(_: Any) -> Any:
        raise RuntimeError("disk on fire")

    server = start_server(loader=broken_loader, wait=False)
    with server.client() as http:
        wait_until(lambda: http.get("/readyz").json()["status"] == "failed", "the load to fail")
        readyz = http.get("/readyz")
        refused = http.post("/v1/generate", json={"prompt": "a"})
    assert readyz.status_code == 503
    assert "disk on fire" in readyz.json()["error"]
    assert refused.status_code == 503
    assert "disk on fire" in refused.json()["error"]["message"]


def test_disconnected_client_work_is_dropped(start_server: Any) -> None:
    server = start_server(max_queue=4)
    results: list[httpx.Response] = []

    def occupy() -> None:
        with server.client() as http:
            results.append(http.post("/v1/generate", json={**SLOW, "steps": 40}))

    blocker = threading.Thread(target=occupy)
    blocker.start()
    # the first job is running; the next one waits in the queue
    wait_until(
        lambda: metric_value(server.url, "loraswap_generations_in_flight") == 1, "the first job to run"
    )
    with server.client(timeout=0.5) as impatient, contextlib.suppress(httpx.TimeoutException):
        impatient.post("/v1/generate", json={"prompt": "never drawn", "steps": 2})
    blocker.join(120)
    assert results and results[0].status_code == 200
    wait_until(
        lambda: (
            metric_value(server.url, "loraswap_generations_in_flight") == 0
            and metric_value(server.url, "loraswap_queue_depth") == 0
        ),
        "the worker to drain",
    )
    samples = metric_samples(server)
    assert value(samples, "loraswap_images_generated_total") == 1.0
    assert value(samples, "loraswap_queue_depth") == 0.0


def test_metrics_exposition(server: Any) -> None:
    with server.client() as http:
        assert http.post("/v1/generate", json={"prompt": "a", "steps": 2, "num_images": 2}).status_code == 200
        assert http.post("/v1/generate", json={"prompt": "a", "steps": 0}).status_code == 422
    samples = metric_samples(server)
    assert (
        value(
            samples,
            "loraswap_request_duration_seconds_count",
            route="/v1/generate",
            method="POST",
            status="200",
        )
        == 1.0
    )
    assert (
        value(
            samples,
            "loraswap_request_duration_seconds_count",
            route="/v1/generate",
            method="POST",
            status="422",
        )
        == 1.0
    )
    for stage in ("queue", "text_encode", "denoise", "decode", "encode"):
        assert value(samples, "loraswap_stage_duration_seconds_count", stage=stage) == 1.0, stage
    assert value(samples, "loraswap_images_generated_total") == 2.0
    assert value(samples, "loraswap_errors_total", type="validation_error") == 1.0
    assert "loraswap_queue_depth" in samples
    assert "loraswap_generations_in_flight" in samples
    assert value(samples, "loraswap_ready") == 1.0
    assert "loraswap_cuda_memory_allocated_bytes" not in samples  # a CPU model: no CUDA gauges
    assert "loraswap_cuda_memory_reserved_bytes" not in samples
    buckets = [s for s in samples["loraswap_stage_duration_seconds_bucket"] if s.labels["stage"] == "denoise"]
    assert max(float(s.labels["le"]) for s in buckets if s.labels["le"] != "+Inf") >= 60
