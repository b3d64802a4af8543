"""``GET /v1/server``: what the console's server view shows, in one JSON answer.

Readiness, the queue, the limits and sampler names a client needs to build a request, the caller's
token scopes, the adapter cache's tiers and the last generations with their stage timings
(``service/engine/recent.py``). Scope ``generate``.
"""

from __future__ import annotations

from typing import Any, get_args

from litestar import Controller, Request, get

from service.auth import request_scopes, require
from service.engine.runtime import Runtime
from service.openapi import ROUTE_ERRORS
from service.schemas import SchedulerName


def server_view(runtime: Runtime, scopes: list[str]) -> dict[str, Any]:
    settings = runtime.settings
    base = runtime.base
    adapters = runtime.adapters
    return {
        "status": runtime.state,
        "ready": runtime.ready,
        "error": runtime.error,
        "model": None
        if base is None
        else {"name": base.name, "fingerprint": base.fingerprint, "native_size": base.native_size},
        "queue": {"depth": runtime.worker.depth, "max": settings.max_queue},
        "limits": {
            "max_width": settings.max_width,
            "max_height": settings.max_height,
            "max_steps": settings.max_steps,
            "max_images": settings.max_images,
            "max_adapter_bytes": settings.max_adapter_bytes,
            "max_pictures": settings.max_pictures,
            "max_picture_bytes": settings.max_picture_bytes,
        },
        "schedulers": list(get_args(SchedulerName)),
        "scopes": scopes,
        "cache": None if adapters is None else adapters.cache.tiers(),
        "store": None if adapters is None else adapters.store_health(),
        "recent": runtime.recent.snapshot(),
    }


class ServerController(Controller):
    path = "/v1/server"
    tags = ["server"]
    guards = [require("generate")]

    @get(
        "/",
        summary="Server status for consoles: readiness, queue, limits, cache tiers, recent requests.",
        description=(
            "Always 200 for a valid token, ready or not (`ready`, `status`: starting, ready, failed, "
            "stopping). `schedulers` and `limits` are what `POST /v1/generate` accepts; `scopes` the "
            "caller's token scopes; `cache` the adapters resident per tier (device and host entries, the "
            "disk tier's totals; null before the model is loaded); `recent` the last 50 generations, "
            "newest first, with `timings` per stage (prompts are not kept)."
        ),
        responses=ROUTE_ERRORS["server"],
    )
    async def status(self, request: Request[Any, Any, Any], runtime: Runtime) -> dict[str, Any]:
        return server_view(runtime, sorted(request_scopes(request)))
