"""The locust user of the load suite: closed-loop ``POST /v1/generate`` with a Zipf mix of adapters.

Run by ``python -m loadtests.load`` (one ``locust --headless`` process per phase); the phase's settings
come from the JSON file named by ``LOADTEST_CONFIG`` (see ``PhaseConfig`` in ``phases.py``). Every
response is appended to the JSON-lines file ``records`` (start time, latency, status, ``Retry-After``,
the adapter asked for, an error note), from which the harness computes its figures exactly; locust's
own CSV statistics go to the run's temporary folder as a cross-check.

A user sends one request at a time with no think time. A 429 is answered as a well-behaved client
would: it waits ``Retry-After`` seconds (capped) before its next request. A 200 must carry one image and
echo the adapter that was asked for (a hot-swap mix-up would show as an error here).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task

from loadtests.load.mix import ZipfMix
from loadtests.load.stats import valid_retry_after

PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "two blue circles on a grey background",
)

CONFIG: dict[str, Any] = json.loads(open(os.environ["LOADTEST_CONFIG"]).read())  # noqa: SIM115
_records = open(CONFIG["records"], "a", buffering=1)  # noqa: SIM115 - closed on quitting


@events.quitting.add_listener
def _close_records(**_kwargs: Any) -> None:
    _records.close()


def record(**fields: Any) -> None:
    _records.write(json.dumps(fields) + "\n")


def check_success(response: Any, adapter: str | None) -> str | None:
    """Why a 200 is wrong, or ``None``."""
    try:
        body = response.json()
    except ValueError:
        return "200 without a JSON body"
    if len(body.get("images", [])) != 1:
        return "200 without exactly one image"
    echoed = [a.get("id") for a in body.get("adapters", [])]
    if echoed != ([adapter] if adapter else []):
        return f"asked for {adapter!r}, served {echoed!r}"
    return None


class GenerateUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = float(CONFIG["client_timeout_s"])
    connection_timeout = 30.0

    def on_start(self) -> None:
        self.mix = ZipfMix(
            CONFIG["adapters"], CONFIG["zipf_s"], CONFIG["base_share"], seed=random.getrandbits(64)
        )

    @task
    def generate(self) -> None:
        adapter = self.mix.sample()
        body = {
            "prompt": random.choice(PROMPTS),
            "steps": CONFIG["steps"],
            "width": CONFIG["size"],
            "height": CONFIG["size"],
            "seed": random.randrange(2**31),
            "adapters": [{"id": adapter}] if adapter else [],
        }
        started_wall, started = time.time(), time.perf_counter()
        with self.client.post("/v1/generate", json=body, catch_response=True) as response:
            latency = time.perf_counter() - started
            status = int(response.status_code or 0)
            retry_after = response.headers.get("Retry-After") if status else None
            error = self.judge(response, status, retry_after, adapter)
            record(
                t=started_wall, latency_s=latency, status=status, retry_after=retry_after,
                adapter=adapter, error=error,
            )  # fmt: skip
        if status == 429 and CONFIG["honour_retry_after"]:
            gevent.sleep(min(retry_wait(retry_after), float(CONFIG["retry_after_cap_s"])))

    @staticmethod
    def judge(response: Any, status: int, retry_after: str | None, adapter: str | None) -> str | None:
        """Mark the response for locust's statistics; the error note for the record, if any."""
        error: str | None
        if status == 200:
            error = check_success(response, adapter)
        elif status == 429:
            error = None if valid_retry_after(retry_after) else f"429 with Retry-After {retry_after!r}"
        else:
            error = f"{status}: {(response.text or str(response.error))[:300]}"
        if error is None:
            response.success()
        else:
            response.failure(error)
        return error


def retry_wait(header: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` header; 1 s when it is absent or not delta-seconds."""
    return float(header.strip()) if header is not None and valid_retry_after(header) else 1.0
