"""``LoraswapIngress``: the fleet's HTTP front. It keys a request and forwards it; it answers nothing itself
except ``GET /metrics`` (every replica's metrics, labelled ``replica``) and the errors of the hop
(no replica, back-pressure), in the app's own error bodies.

Keying (``AdapterKeys``): for ``POST /v1/generate`` the body (already read, bounded by the app's own
limit + 1 byte) is parsed for its adapters (the ``adapters`` list and ``<lora:…>`` prompt tags, with
the app's validation), each version resolved (``latest`` → a number through the shared registry, with
the same TTL as the replicas), and the sorted ``id@N`` list becomes the request's multiplexed model
id. Anything it cannot key (bad JSON, unknown adapter, a token without the generate scope, a slow store)
goes without a key, and the replica's app gives the answer ``loraswap serve`` would.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from adapters.registry import Registry
from adapters.sources import open_settings_store
from basemodel.errors import LoraswapError, NotReady, Overloaded
from basemodel.settings import Settings
from service.auth import scopes_for
from service.lora.request import adapter_request, extract_prompt_adapters
from service.lora.resolver import AdapterResolver, StoreGate
from service.ray.asgi import Forwarded, Reply, read_bounded, send_reply
from service.ray.fleet_metrics import merge
from service.ray.options import RayOptions
from service.ray.routing import adapter_set_key

log = logging.getLogger(__name__)
UPLOAD_SLACK = 1 << 16  # multipart boundaries and headers around an adapter file
KEY_DEADLINE_S = 1.0  # the most a request waits at the front for a 'latest' resolution


def error_reply(exc: LoraswapError, status: int, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps({"error": exc.to_dict()}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    pairs = [(b"content-type", b"application/json"), *extra]
    return Reply(status, pairs, body)


def body_limit(settings: Settings, method: str, path: str) -> int:
    """What the app reads of a request at most: the adapter file limit for uploads, else the JSON limit."""
    if method == "POST" and path.rstrip("/") == "/v1/adapters":
        return settings.max_adapter_bytes + settings.max_body_bytes + UPLOAD_SLACK
    return settings.max_body_bytes


class AdapterKeys:
    """The multiplexed model id of a generate request (``routing.adapter_set_key``), or ``None``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        registry = Registry.from_settings(settings, None, store=open_settings_store(settings), sweep=False)
        self.gate = StoreGate(lambda: 1, threads=2)
        self.resolver = AdapterResolver(
            registry,
            self.gate,
            lambda _version: True,  # the front holds no files: what it remembers is enough to key
            ttl_s=settings.latest_ttl_s,
            stale_max_s=settings.latest_stale_max_s,
            on_latest=lambda _version, _previous: None,
        )

    def allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        if not self.settings.auth_enabled:
            return True
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and "generate" in scopes_for(token.strip(), self.settings)
        return False

    async def key(self, request: Forwarded) -> str | None:
        if not self.allowed(request.headers):
            return None  # the replica answers 401/403; an anonymous caller never reaches the store
        try:
            data = json.loads(request.body)
            _, tagged = extract_prompt_adapters(str(data.get("prompt", "")))
            named = [
                adapter_request(a["id"], a.get("version"), None, field=f"adapters.{i}")
                for i, a in enumerate(data.get("adapters") or [])
            ]
            deadline = time.monotonic() + min(self.settings.store_deadline_s, KEY_DEADLINE_S)
            versions = []
            for wanted in named + tagged:
                number = wanted.version
                if number is None:
                    number = (await self.resolver.resolve(wanted, deadline)).version.version
                versions.append((wanted.adapter_id, number))
        except Exception as exc:  # not keyable: the replica's app validates and answers
            log.debug("request not keyed: %s", exc)
            return None
        return adapter_set_key(versions)

    def close(self) -> None:
        self.gate.close()


class LoraswapIngress:
    def __init__(self, args: dict[str, Any], replicas: Any, hub: Any) -> None:
        self.options = RayOptions.from_args(args)
        self.settings = self.options.settings()
        self.replicas = replicas
        self.hub = hub
        self.keys = AdapterKeys(self.settings)

    def __serve_build_asgi_app__(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # a function: ASGI 3
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/metrics":
            await send_reply(send, await self.fleet_metrics())
            return
        body, _ = await read_bounded(receive, body_limit(self.settings, method, path))
        request = Forwarded(
            method,
            path,
            scope.get("query_string", b""),
            [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
            body,
            tuple(scope["client"]) if scope.get("client") else None,
            scope.get("scheme", "http"),
        )
        key = await self.keys.key(request) if (method, path) == ("POST", "/v1/generate") else None
        await send_reply(send, await self.forward(request, key))

    async def forward(self, request: Forwarded, key: str | None) -> Reply:
        from ray.serve.exceptions import BackPressureError

        handle = self.replicas.options(multiplexed_model_id=key) if key else self.replicas
        try:
            reply: Reply = await handle.forward.remote(request)
            return reply
        except BackPressureError:
            exc = Overloaded("every replica's queue is full; retry later", retry_after_s=1)
            return error_reply(exc, 429, {"Retry-After": "1"})
        except Exception as error:  # a replica died mid-request or none is running
            log.warning("forwarding %s %s failed: %s", request.method, request.path, error)
            unready = NotReady(f"no replica answered: {type(error).__name__}", hint="Retry shortly.")
            return error_reply(unready, 503, {"Retry-After": "5"})

    async def fleet_metrics(self) -> Reply:
        texts: dict[str, str] = await self.hub.snapshot.remote()
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
        return Reply(200, [(b"content-type", content_type)], merge(texts))

    def __del__(self) -> None:
        self.keys.close()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
