"""The compatible routes share /v1/generate's admission, queue and metrics: a full queue is 429 on them
too (webuiapi's RuntimeError, the openai SDK's RateLimitError), and A1111's progress shows the queue."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai
import pytest
import webuiapi

from tests.service.conftest import metric_value, wait_until

QUICK = {"prompt": "a red circle", "steps": 2, "seed": 1}


def test_full_queue_is_429_on_the_compatible_routes_and_progress_shows_it(start_server: Any) -> None:
    server = start_server(max_queue=1)
    worker = server.server.config.app.state.runtime.worker
    gate = threading.Event()
    run_batch = worker._run

    def gated(jobs: list[Any]) -> list[Any]:  # hold the worker until the probes are done
        gate.wait(120)
        return run_batch(jobs)

    worker._run = gated
    responses: list[httpx.Response] = []

    def occupy() -> None:
        with server.client() as http:
            responses.append(http.post("/v1/generate", json=QUICK))

    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    blockers = [threading.Thread(target=occupy) for _ in range(2)]
    try:
        blockers[0].start()
        wait_until(lambda: worker.running == 1, "the first request to run")
        blockers[1].start()
        wait_until(lambda: worker.depth == 1, "the second request to wait in the queue")
        progress = api.get_progress()
        with pytest.raises(RuntimeError) as a1111:
            api.txt2img(prompt="a red circle", steps=2, width=32, height=32)
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.generate(prompt="a red circle", extra_body={"steps": 2})
    finally:
        gate.set()
        for blocker in blockers:
            blocker.join(120)
    assert progress["state"]["job_count"] == 2
    assert progress["state"]["queued"] == 1
    assert progress["progress"] == 0.01
    assert progress["eta_relative"] > 0
    assert a1111.value.args[0] == 429
    assert "overloaded" in a1111.value.args[1]
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "overloaded"
    assert sorted(r.status_code for r in responses) == [200, 200]
    duration = "loraswap_request_duration_seconds_count"
    assert metric_value(server.url, duration, route="/sdapi/v1/txt2img", status="429") == 1
    assert metric_value(server.url, duration, route="/v1/images/generations", status="429") == 1
    assert metric_value(server.url, "loraswap_errors_total", type="overloaded") == 2
    assert api.get_progress()["state"]["job_count"] == 0
