"""The compatible routes share /v1/generate's admission, queue and metrics: a full queue is 429 on them
too (webuiapi's RuntimeError, the openai SDK's RateLimitError); A1111's progress shows the queue and
the running request's step."""

from __future__ import annotations

import threading
from collections.abc import Callable
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


def test_progress_reports_the_running_requests_step(server: Any) -> None:
    worker = server.server.config.app.state.runtime.worker
    run_batch = worker._run
    at_three, resume = threading.Event(), threading.Event()

    def held(jobs: list[Any]) -> list[Any]:  # hold the sampler after step 3 of 8
        for job in jobs:
            advance: Callable[[int, int], None] = job.progress.advance

            def holding(step: int, steps: int, advance: Callable[[int, int], None] = advance) -> None:
                advance(step, steps)
                if step == 3:
                    at_three.set()
                    resume.wait(120)

            job.progress.advance = holding
        return run_batch(jobs)

    worker._run = held
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")
    done: list[Any] = []
    runner = threading.Thread(
        target=lambda: done.append(api.txt2img(prompt="a red circle", steps=8, width=32, height=32))
    )
    runner.start()
    try:
        wait_until(at_three.is_set, "step 3 of the A1111 request")
        progress = api.get_progress()
    finally:
        resume.set()
        runner.join(120)
    assert (progress["state"]["sampling_step"], progress["state"]["sampling_steps"]) == (3, 8)
    assert progress["progress"] == 3 / 8
    assert progress["state"]["job_count"] == 1 and progress["eta_relative"] > 0
    assert len(done) == 1 and len(done[0].images) == 1
    assert api.get_progress()["progress"] == 0.0
