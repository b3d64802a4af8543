"""The Litestar app factory (litestar-fullstack style): settings, DI, controllers, lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins.pydantic import PydanticPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from basemodel.loader import BaseModel
from basemodel.settings import Settings
from service.bodies import CheckedRequest
from service.controllers.adapters import AdapterController
from service.controllers.generate import GenerateController
from service.controllers.health import HealthController
from service.controllers.jobs import JobController
from service.controllers.openai_images import OpenAIImagesController
from service.controllers.pictures import PictureController
from service.controllers.sdapi import SdapiController
from service.controllers.server import ServerController
from service.controllers.ui import ConsoleController
from service.engine.jobs import JobStore
from service.engine.runtime import Runtime, package_version
from service.errors import EXCEPTION_HANDLERS
from service.metrics import Metrics
from service.openapi import prune_openapi
from service.uploads import spool_dir, sweep_spool

log = logging.getLogger(__name__)


def instrument(handler: ASGIApp, metrics: Metrics) -> ASGIApp:
    """Outermost ASGI layer: request duration by route template, method and final status."""

    async def timed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await handler(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await handler(scope, receive, capture)
        finally:
            route = scope.get("path_template") or "unmatched"
            method = str(scope.get("method", ""))
            metrics.request_duration.labels(route=route, method=method, status=str(status)).observe(
                time.perf_counter() - started
            )

    return timed


def create_app(
    settings: Settings,
    *,
    loader: Callable[[Settings], BaseModel] | None = None,
) -> Litestar:
    metrics = Metrics()
    runtime = Runtime(settings, metrics, loader=loader)
    jobs = JobStore(settings, metrics, runtime)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        for path in sweep_spool(spool_dir(settings.home)):
            log.warning("removed %s, an upload spool file left by a server that was killed", path)
        runtime.start()
        try:
            yield
        finally:
            jobs.shutdown()
            runtime.stop()

    app = Litestar(
        route_handlers=[
            GenerateController,
            HealthController,
            AdapterController,
            JobController,
            SdapiController,
            OpenAIImagesController,
            PictureController,
            ServerController,
            ConsoleController,
        ],
        dependencies={
            "runtime": Provide(lambda: runtime, sync_to_thread=False),
            "metrics": Provide(lambda: metrics, sync_to_thread=False),
            "jobs": Provide(lambda: jobs, sync_to_thread=False),
        },
        state=State({"settings": settings, "metrics": metrics, "runtime": runtime, "jobs": jobs}),
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_class=CheckedRequest,
        plugins=[PydanticPlugin(validate_strict=True)],  # Litestar passes strict=False otherwise
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="loraswap",
            version=package_version(),
            description="Stable Diffusion generation with per-request LoRA adapters.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        debug=False,
    )
    prune_openapi(app)
    app.asgi_handler = instrument(app.asgi_handler, metrics)
    return app


def app_from_env() -> Any:
    """``uvicorn --factory service.app:app_from_env`` entry point (settings from LORASWAP_* env)."""
    from basemodel.settings import load_settings

    return create_app(load_settings())
