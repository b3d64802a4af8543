"""Liveness, readiness and Prometheus exposition."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.engine.jobs import JobStore
from service.engine.runtime import Runtime
from service.metrics import Metrics


class HealthController(Controller):
    tags = ["health"]

    @get("/healthz", summary="Liveness: the process is up.")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/readyz",
        summary="Readiness: 200 once the model is loaded and warmed up, else 503.",
        description=(
            "`store` reports the adapter store as the server's last calls saw it: `state` ok, degraded "
            "or down, the circuit `breaker` (closed, half_open, open) and the `last_error`. A failing "
            "store does not make the server unready: adapters it holds are still served. `limits` are "
            "the request limits in effect once the model is loaded (`derived`: those that follow its "
            "native size; docs/api.md, 'Limits')."
        ),
    )
    async def readyz(self, runtime: Runtime) -> Response[dict[str, Any]]:
        body: dict[str, Any] = {"status": runtime.state}
        if runtime.error:
            body["error"] = runtime.error
        if runtime.base is not None:
            body["model"] = {"name": runtime.base.name, "fingerprint": runtime.base.fingerprint}
        if runtime.limits is not None:
            body["limits"] = runtime.limits.to_json()
        if runtime.adapters is not None:  # informative only: a failing store does not make it unready
            body["store"] = runtime.adapters.store_health()
        return Response(body, status_code=200 if runtime.ready else 503)

    @get("/metrics", summary="Prometheus metrics.", include_in_schema=False)
    async def metrics(self, metrics: Metrics, runtime: Runtime, jobs: JobStore) -> Response[bytes]:
        metrics.queue_depth.set(runtime.worker.depth)
        jobs.observe()
        metrics.observe_device_memory(runtime.base.device if runtime.base is not None else None)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
