"""deploy/grafana/loraswap.json: a well-formed dashboard whose every PromQL expression names real metrics.

The metric names are read from a live server's ``/metrics`` (``# TYPE`` lines, so labelled series count
before their first sample), expanded the way Prometheus exposes them (counter → ``_total``, histogram →
``_bucket``/``_sum``/``_count``). The CUDA memory gauges are only exported when the model is on CUDA, so
their names come from the exposition of the code that exports them (service.metrics.CudaMemory); so do
the Ray mode's routing metrics (service.ray.replica.routing_counter, which each Ray replica adds).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import CudaMemory
from service.ray.replica import routing_counter
from tests.deploy.manifests import DEPLOY, one
from tests.service.conftest import RunningServer, start_server  # noqa: F401  (fixtures)

DASHBOARD = DEPLOY / "grafana" / "loraswap.json"
METRIC = re.compile(r"\b(loraswap_[a-z0-9_]+)\b")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count"),
}


def exported(text: str) -> set[str]:
    """Sample names of every metric family in a Prometheus text exposition."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name  # TYPE may carry the suffix
        names.update(base + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "loraswap"
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert all(target["expr"].count("(") == target["expr"].count(")") for target in panel["targets"])


def test_every_expression_names_a_metric_the_server_exports(start_server: Any) -> None:
    server: RunningServer = start_server()
    live = exported(httpx.get(f"{server.url}/metrics", timeout=60).text)
    code_only = CollectorRegistry()
    CudaMemory(code_only)
    routing_counter(code_only)
    known = live | exported(generate_latest(code_only).decode())
    used = {name for expr in expressions(json.loads(DASHBOARD.read_text())) for name in METRIC.findall(expr)}
    assert used, "no loraswap metric in the dashboard"
    assert used <= known, f"the dashboard names metrics the server does not export: {sorted(used - known)}"
    assert "loraswap_made_up_total" not in known  # the check can fail
    hpa = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert {m["pods"]["metric"]["name"] for m in hpa if m["type"] == "Pods"} <= live
