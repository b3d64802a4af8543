"""``LoraswapReplica``: one Ray Serve replica = one base model running the ``loraswap serve`` app.

The replica builds the app of ``service.app.create_app`` (worker thread, cache tiers, hot-swap, our own
mixed-adapter batching) and runs every forwarded request through it (``asgi.call_app``), so routes,
auth, limits, error bodies and OpenAPI are that app's. Its constructor returns only once the model is
loaded and warmed up: Ray Serve sends a replica no traffic before that. On scale-down or shutdown
Ray stops routing to it, waits for its in-flight requests (``graceful_shutdown_timeout_s``), then
``__del__`` runs the app's shutdown, which drains the worker as ``loraswap serve`` does on SIGTERM.

Residency reaches the router through ``record_routing_stats`` (the device tier's ``id@N`` list, read
from our cache, the source of truth); ``loraswap_routing_requests_total{held}`` counts keyed requests
by whether this replica held their adapters when they arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from basemodel.settings import Settings
from service.app import create_app
from service.engine.runtime import Runtime
from service.ray.asgi import Forwarded, Reply, call_app
from service.ray.options import RayOptions
from service.ray.routing import held_by

log = logging.getLogger(__name__)
GENERATE = ("POST", "/v1/generate")
READY_POLL_S = 0.1
HUB_TIMEOUT_S = 2.0


def routing_counter(registry: CollectorRegistry) -> Counter:
    """``loraswap_routing_requests_total{held}`` in ``registry``, both label values present from the start."""
    routed = Counter(
        "loraswap_routing_requests",
        "Requests with adapters routed to this replica, by whether its device tier held all of them.",
        ["held"],
        registry=registry,
    )
    for held in ("true", "false"):
        routed.labels(held=held)
    return routed


def replica_settings(options: RayOptions, slot: str) -> Settings:
    """The fleet's settings, with this replica's own disk tier (the registry stays shared)."""
    settings = options.settings()
    cache = settings.adapter_cache_dir or settings.home / "cache" / "adapters"
    return settings.model_copy(update={"adapter_cache_dir": cache / slot})


class LoraswapReplica:
    async def __init__(self, args: dict[str, Any], hub: Any = None) -> None:  # type: ignore[misc]
        from ray import serve

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        rank = getattr(context.rank, "rank", None)
        options = RayOptions.from_args(args)
        self.settings = replica_settings(options, f"replica-{rank}" if rank is not None else self.replica_id)
        self.app = create_app(self.settings)
        self.runtime: Runtime = self.app.state.runtime
        self.routed = routing_counter(self.app.state.metrics.registry)
        self._hub = hub
        self._push_s = options.metrics_push_s
        self._lifespan = _Lifespan(self.app)
        await self._lifespan.startup()
        while self.runtime.state not in ("ready", "failed"):
            await asyncio.sleep(READY_POLL_S)
        if self.runtime.state == "failed":
            await self._lifespan.shutdown()
            raise RuntimeError(f"replica {self.replica_id} did not start: {self.runtime.error}")
        self._pusher = asyncio.ensure_future(self._push_metrics()) if hub is not None else None
        log.info("replica %s ready (disk tier %s)", self.replica_id, self.settings.adapter_cache_dir)

    # -- requests ----------------------------------------------------------------------------------
    async def forward(self, request: Forwarded) -> Reply:
        from ray import serve

        key = serve.get_multiplexed_model_id() or None
        if key is not None and (request.method, request.path) == GENERATE:
            self.routed.labels(held="true" if held_by(key, self.held()) else "false").inc()
        return await call_app(self.app, request)

    def held(self) -> frozenset[str]:
        adapters = self.runtime.adapters
        if adapters is None:
            return frozenset()
        return frozenset(f"{adapter_id}@{number}" for adapter_id, number, _ in adapters.cache.resident())

    # -- what Ray Serve calls ----------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        return {"held": sorted(self.held())}

    def check_health(self) -> None:
        if self.runtime.state not in ("ready", "stopping"):
            raise RuntimeError(f"replica {self.replica_id} is {self.runtime.state}: {self.runtime.error}")

    async def __del__(self) -> None:
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.cancel()
        if self._hub is not None:  # bounded: on app deletion the hub may be gone already
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._hub.forget.remote(self.replica_id), timeout=HUB_TIMEOUT_S)
        await self._lifespan.shutdown()  # drains the worker (graceful_timeout_s), as loraswap serve does

    # -- metrics -----------------------------------------------------------------------------------
    async def _push_metrics(self) -> None:
        scrape = Forwarded("GET", "/metrics", b"", [(b"accept", b"text/plain")], b"")
        while True:
            try:
                reply = await call_app(self.app, scrape)
                push = self._hub.push.remote(self.replica_id, reply.body.decode())
                await asyncio.wait_for(push, timeout=HUB_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub restarting: try again next period
                log.debug("pushing metrics failed: %s", exc)
            await asyncio.sleep(self._push_s)


class _Lifespan:
    """The app's ASGI lifespan (start-up: begin loading; shutdown: drain), driven as uvicorn does."""

    def __init__(self, app: Any) -> None:
        import uvicorn
        from uvicorn.lifespan.on import LifespanOn

        config = uvicorn.Config(app, lifespan="on", log_level="warning")
        config.loaded_app = app  # the app object itself, not uvicorn's import-string loading
        self._lifespan = LifespanOn(config)
        self._started = False

    async def startup(self) -> None:
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError("the app's start-up failed; see the replica log")
        self._started = True

    async def shutdown(self) -> None:
        if self._started:
            self._started = False
            await self._lifespan.shutdown()
