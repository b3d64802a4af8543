"""A job abandoned inside a long denoising step stops within about a second (issue 20, item 2).

One step of a huge image can take minutes; cancellation used to be checked only between steps. Here
a 64 px request is made slow by a sleep before each ResNet and transformer block of the UNet (a step
of about 3 s that costs no CPU), and the worker must be free again soon after a client disconnect, a
job DELETE, or the request's deadline — not at the end of the step.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import wait_until

NAP_S = 0.2
SLOW = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
QUICK = {"prompt": "a red circle", "steps": 1, "width": 32, "height": 32, "seed": 3}
FREE_WITHIN_S = 1.0


@pytest.fixture
def slow_step(base_model: Any) -> Iterator[float]:
    """Every forward of the UNet on a 32×32 latent (a 64 px request) naps before each block; yields the
    length of such a step."""
    unet = base_model.pipe.unet
    kinds = ("ResnetBlock2D", "BasicTransformerBlock")
    slowed = [m for m in unet.modules() if type(m).__name__ in kinds]
    local = threading.local()

    def mark(_module: Any, args: tuple[Any, ...]) -> None:
        local.slow = args[0].shape[-1] >= 32

    def nap(_module: Any, _args: Any) -> None:
        if getattr(local, "slow", False):
            time.sleep(NAP_S)

    handles = [unet.register_forward_pre_hook(mark)] + [m.register_forward_pre_hook(nap) for m in slowed]
    try:
        yield len(slowed) * NAP_S
    finally:
        for handle in handles:
            handle.remove()


def runtime_of(server: Any) -> Any:
    return server.server.config.app.state.runtime


def inside_the_step(runtime: Any, step_s: float) -> None:
    """Once the worker runs the slow job, wait until it is well inside its first step."""
    wait_until(lambda: runtime.worker.running == 1, "the slow job to start")
    time.sleep(min(0.6, step_s / 4))
    assert runtime.worker.snapshot().step == 0, "still in the first step"


def seconds_until_free(runtime: Any, since: float) -> float:
    wait_until(lambda: runtime.worker.running == 0, "the worker to drop the job", timeout=60)
    return time.monotonic() - since


def assert_serves(server: Any) -> None:
    with server.client() as http:
        response = http.post("/v1/generate", json=QUICK)
    assert response.status_code == 200, response.text


def test_cancel_inside_a_step_frees_the_worker_within_a_second(start_server: Any, slow_step: float) -> None:
    assert slow_step >= 2.5, "the step must be much longer than the bound"
    server = start_server(request_timeout_s=60)
    runtime = runtime_of(server)
    freed: dict[str, float] = {}

    # 1. the client disconnects from POST /v1/generate
    body = json.dumps(SLOW).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        inside_the_step(runtime, slow_step)
        gone = time.monotonic()
    freed["disconnect"] = seconds_until_free(runtime, gone)
    assert_serves(server)

    # 2. DELETE /v1/jobs/{id}
    with server.client() as http:
        job = http.post("/v1/jobs", json=SLOW).json()
        inside_the_step(runtime, slow_step)
        cancelled = time.monotonic()
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200
        freed["delete"] = seconds_until_free(runtime, cancelled)
    assert_serves(server)
    server.stop()

    # 3. the deadline (request_timeout_s) passes inside the step
    short = start_server(request_timeout_s=1.0)
    runtime = runtime_of(short)
    answer: dict[str, httpx.Response] = {}

    def call() -> None:
        answer["r"] = httpx.post(f"{short.url}/v1/generate", json=SLOW, timeout=60)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: runtime.worker.running == 1, "the slow job to start")
    deadline = runtime.worker._current[0].deadline
    freed["deadline"] = seconds_until_free(runtime, deadline)
    caller.join(60)
    assert answer["r"].status_code == 504 and answer["r"].json()["error"]["type"] == "timeout"
    assert_serves(short)

    print(f"worker free after the cancel (step of {slow_step:.1f} s): {freed}")
    for way, seconds in freed.items():
        assert seconds < FREE_WITHIN_S, (way, seconds, slow_step)
