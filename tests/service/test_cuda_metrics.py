"""The CUDA memory gauges: exported at scrape when the model is on CUDA, absent (CUDA untouched) otherwise.

torch's allocator calls are monkeypatched, so this runs on a CPU machine; a real CPU server's ``/metrics``
is checked for their absence in ``test_lifecycle.test_metrics_exposition``.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.controllers.health import HealthController
from service.metrics import Metrics

ALLOCATED = "loraswap_cuda_memory_allocated_bytes"
RESERVED = "loraswap_cuda_memory_reserved_bytes"


def values(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def gauges(metrics: Metrics) -> dict[str, float]:
    return values(generate_latest(metrics.registry).decode())


@pytest.fixture
def fake_allocator(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.device]]:
    """torch.cuda.memory_allocated/_reserved answering 5 MiB and 20 MiB more on every call."""
    asked: dict[str, list[torch.device]] = {"allocated": [], "reserved": []}

    def allocated(device: torch.device) -> int:
        asked["allocated"].append(device)
        return 5 * 2**20 * len(asked["allocated"])

    def reserved(device: torch.device) -> int:
        asked["reserved"].append(device)
        return 20 * 2**20 * len(asked["reserved"])

    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", reserved)
    return asked


def test_cuda_gauges_follow_the_allocator_of_the_models_device(fake_allocator: dict) -> None:
    metrics = Metrics()
    device = torch.device("cuda", 1)
    metrics.observe_device_memory(device)
    assert gauges(metrics)[ALLOCATED] == 5 * 2**20
    assert gauges(metrics)[RESERVED] == 20 * 2**20
    metrics.observe_device_memory(device)  # the next scrape reads them again
    assert gauges(metrics)[ALLOCATED] == 10 * 2**20
    assert gauges(metrics)[RESERVED] == 40 * 2**20
    assert fake_allocator["allocated"] == [device, device]


@pytest.mark.parametrize("device", [torch.device("cpu"), None])  # None: the model is not loaded yet
def test_cuda_gauges_are_absent_off_cuda_and_cuda_is_never_asked(
    fake_allocator: dict, device: torch.device | None
) -> None:
    metrics = Metrics()
    metrics.observe_device_memory(device)
    found = gauges(metrics)
    assert ALLOCATED not in found and RESERVED not in found
    assert "loraswap_queue_depth" in found
    assert fake_allocator == {"allocated": [], "reserved": []}


def scrape_with(base: Any) -> dict[str, float]:
    """``GET /metrics``'s handler on a fake runtime whose model (or ``None``) is ``base``."""
    metrics = Metrics()
    runtime = SimpleNamespace(base=base, worker=SimpleNamespace(depth=3))
    jobs = SimpleNamespace(observe=lambda: None)  # the job gauges are set at scrape too
    response = asyncio.run(HealthController.metrics.fn(None, metrics=metrics, runtime=runtime, jobs=jobs))
    return values(response.content.decode())


def test_the_scrape_reports_the_models_device(fake_allocator: dict) -> None:
    on_cuda = scrape_with(SimpleNamespace(device=torch.device("cuda", 0)))
    assert on_cuda[ALLOCATED] == 5 * 2**20 and on_cuda[RESERVED] == 20 * 2**20
    assert on_cuda["loraswap_queue_depth"] == 3
    assert fake_allocator["allocated"] == [torch.device("cuda", 0)]
    for base in (SimpleNamespace(device=torch.device("cpu")), None):
        assert ALLOCATED not in scrape_with(base)
    assert len(fake_allocator["allocated"]) == 1
