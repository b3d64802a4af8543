"""``/v1/adapters``: register, list, show, delete and preload LoRA adapters over HTTP.

Registry and store I/O is blocking, so every call into it runs on a worker thread; the event loop only
moves bytes. Reads (list, show) wait for the store until ``store_deadline_s`` and answer 503 with
``Retry-After`` after that. Writes (register, delete) start only after a listing of the id answered
within that deadline, and are then bounded by the store's own timeouts. Registration accepts either a
``multipart/form-data`` upload (streamed and size-checked by ``service/uploads.py``) or a JSON body
naming an ``s3://`` object (fetched by ``adapters/sources/remote.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import Parameter
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError

from adapters.errors import AdapterCorrupt
from adapters.metadata import MAX_SCALE, MIN_SCALE, coerce_metadata
from adapters.pictures import PictureUpload
from adapters.records import AdapterVersion
from adapters.refs import ID_PATTERN, validate_id
from adapters.registry import Registry
from adapters.sources import store_timeouts
from adapters.sources.remote import fetch_s3, parse_s3_uri
from basemodel.errors import LoraswapError, NotReady, ValidationFailed
from basemodel.jsonlimits import loads
from service.auth import require
from service.engine.runtime import Runtime
from service.errors import status_for
from service.lora.request import adapter_request
from service.lora.resolver import STALE_HEADER
from service.lora.worker_manager import AdapterManager
from service.openapi import ROUTE_ERRORS
from service.schemas import STRICT, adapter_id_field, scale_field, version_field
from service.uploads import blocking, read_body, read_upload, spool_dir, upload_arguments

MULTIPART = "multipart/form-data"
JSON = "application/json"


def plain_id(adapter_id: str) -> str:
    """A path's adapter id: a bare id (``style@2`` in the id segment would select a version)."""
    return validate_id(adapter_id)


def adapter_manager(runtime: Runtime) -> AdapterManager:
    """The server's adapter manager; 503 ``not_ready`` until the base model is loaded."""
    runtime.check_ready()
    if runtime.adapters is None:
        raise NotReady("the adapter registry is not available yet")
    return runtime.adapters


# -- request bodies ---------------------------------------------------------------------------------


class RegisterFromSource(BaseModel):
    """JSON registration: fetch the adapter file from S3."""

    model_config = STRICT

    id: str = adapter_id_field(description="Adapter id.", examples=["watercolor"])
    source: str = Field(description="s3://bucket/key of a .safetensors file.", examples=["s3://b/k"])
    metadata: dict[str, Any] | None = Field(None, description="AdapterMetadata fields (docs/adapters.md).")
    scale_default: float | None = scale_field("Weight, -4..4, used when a request gives none.")


class PreloadRequest(BaseModel):
    model_config = STRICT

    version: int | None = version_field("Version to load; latest when absent.")
    pin: bool = Field(False, description="Never evict it from the device tier.")


def validated(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` with a pydantic model; problems → 422 with the same shape Litestar's have."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ValidationFailed(message, detail={"errors": problems}) from None


def register(
    registry: Registry,
    source: bytes | Path,
    adapter_id: str,
    metadata: dict[str, Any] | str | None,
    scale_default: float | None,
    pictures: Sequence[PictureUpload] = (),
) -> tuple[AdapterVersion, bool]:
    """Register through the server's registry; (version, whether this call created it). Blocking."""
    return registry.register_outcome(
        source, adapter_id, coerce_metadata(metadata), scale_default=scale_default, pictures=pictures
    )


def adapter_detail(registry: Registry, adapter_id: str) -> dict[str, Any]:
    versions = registry.versions(adapter_id)
    if not versions:
        versions = [registry.resolve(adapter_id)]  # raises the right 404 (unknown id / all deleted)
    return {
        "adapter_id": adapter_id,
        "latest": versions[-1].to_dict(),
        "versions": [v.to_dict() for v in versions],
    }


def describe_version(registry: Registry, ref: str) -> dict[str, Any]:
    """The record and the header metadata; a header that cannot be read gives ``metadata_error``."""
    version = registry.resolve(ref)
    try:
        metadata = registry.read_metadata(version)
    except AdapterCorrupt as exc:  # e.g. stored before its header was checked against the cap
        return {**version.to_dict(), "metadata": None, "metadata_error": exc.to_dict()}
    return {**version.to_dict(), "metadata": metadata.model_dump(mode="json", exclude_none=True)}


def _string(description: str, **kwargs: Any) -> Schema:
    return Schema(type=OpenAPIType.STRING, description=description, **kwargs)


@dataclass
class RegisterOperation(Operation):
    """OpenAPI for the register route, which reads its body itself: both accepted encodings."""

    def __post_init__(self) -> None:
        id_schema = _string("Adapter id.", pattern=ID_PATTERN.pattern)
        scale = Schema(
            type=OpenAPIType.NUMBER,
            minimum=MIN_SCALE,
            maximum=MAX_SCALE,
            description="Weight, -4..4, used when a request gives none.",
        )
        self.request_body = RequestBody(
            required=True,
            content={
                MULTIPART: OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["file", "id"],
                        properties={
                            "file": _string("The LoRA .safetensors file.", format=OpenAPIFormat.BINARY),
                            "id": id_schema,
                            "metadata": _string("AdapterMetadata fields as JSON text (docs/adapters.md)."),
                            "scale_default": scale,
                            "picture": Schema(
                                type=OpenAPIType.ARRAY,
                                items=_string(
                                    "A preview image (PNG, JPEG or WebP).", format=OpenAPIFormat.BINARY
                                ),
                                description="Preview images; repeat the part (at most max_pictures in all).",
                            ),
                            "loss_curve": _string(
                                "The training loss curve image.", format=OpenAPIFormat.BINARY
                            ),
                            "samples": _string("A sample grid image.", format=OpenAPIFormat.BINARY),
                        },
                    )
                ),
                JSON: OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["id", "source"],
                        properties={
                            "id": id_schema,
                            "source": _string("s3://bucket/key of a .safetensors file (only s3://)."),
                            "metadata": Schema(
                                type=OpenAPIType.OBJECT, description="AdapterMetadata fields."
                            ),
                            "scale_default": scale,
                        },
                    )
                ),
            },
        )


# -- the controller -------------------------------------------------------------------------------------


class AdapterController(Controller):
    path = "/v1/adapters"
    tags = ["adapters"]

    @post(
        "/",
        guards=[require("admin")],
        status_code=201,
        request_max_body_size=None,  # enforced in the handler: max_adapter_bytes / max_body_bytes
        operation_class=RegisterOperation,
        responses=ROUTE_ERRORS["register"],
        summary="Register an adapter version.",
        description=(
            "Either `multipart/form-data` with `file` (a LoRA .safetensors), `id`, optional `metadata` "
            "(JSON text), `scale_default` and pictures (`picture` parts, repeatable, plus `loss_curve` and "
            "`samples`: PNG, JPEG or WebP, at most `max_pictures` of `max_picture_bytes` each, 422 "
            "`image_invalid` / `image_too_large` otherwise), or JSON `{id, source: 's3://bucket/key', "
            "metadata?, scale_default?}`. 201 with the new version record and `created: true`; 200 with "
            "`created: false` when identical content is already a live version of that id. "
            "413 above `max_adapter_bytes`, 422 for invalid files or ids, 409 when the adapter does not "
            "fit the base model."
        ),
    )
    async def register_adapter(self, request: Request[Any, Any, Any], runtime: Runtime) -> Response[Any]:
        manager = adapter_manager(runtime)
        settings = runtime.settings
        counter = runtime.metrics.adapter_registrations
        content_type, options = request.content_type
        try:
            if content_type == MULTIPART:
                upload = await read_upload(
                    request,
                    options.get("boundary"),
                    max_file_bytes=settings.max_adapter_bytes,
                    max_field_bytes=settings.max_body_bytes,
                    spool=spool_dir(settings.home),
                    max_pictures=settings.max_pictures,
                    max_picture_bytes=settings.max_picture_bytes,
                )
                try:
                    adapter_id, metadata, scale = upload_arguments(upload)
                    assert upload.path is not None
                    await manager.check_store(adapter_id)
                    version, created = await blocking(
                        register, manager.registry, upload.path, adapter_id, metadata, scale, upload.pictures
                    )
                finally:
                    await blocking(upload.cleanup)
            elif content_type == JSON:
                raw = await read_body(request, settings.max_body_bytes)
                body = loads(raw, what="the request body", field="body")
                spec: RegisterFromSource = validated(RegisterFromSource, body)
                parse_s3_uri(spec.source)
                await manager.check_store(spec.id)
                data = await blocking(
                    fetch_s3,
                    spec.source,
                    settings.s3_endpoint_url,
                    settings.max_adapter_bytes,
                    timeouts=store_timeouts(settings),
                )
                version, created = await blocking(
                    register, manager.registry, data, spec.id, spec.metadata, spec.scale_default
                )
            else:
                raise ValidationFailed(
                    f"unsupported content type {content_type!r}",
                    detail={"field": "body", "accepted": [MULTIPART, JSON]},
                    hint="Upload the file as multipart/form-data or send JSON with an s3:// source.",
                )
        except LoraswapError as exc:
            if status_for(exc) < 500:
                counter.labels(outcome="rejected").inc()
            raise
        counter.labels(outcome="created" if created else "existing").inc()
        if created:
            manager.registered(version)
        return Response(
            {**version.to_dict(), "created": created},
            status_code=201 if created else 200,
            headers={"Location": f"/v1/adapters/{version.adapter_id}/versions/{version.version}"},
        )

    @get(
        "/",
        guards=[require("generate")],
        summary="List adapters.",
        responses=ROUTE_ERRORS["list"],
        description="Every adapter id with its latest live version and version counts.",
    )
    async def list_adapters(
        self,
        runtime: Runtime,
        include_deleted: bool = Parameter(
            default=False, description="Also list ids whose versions are all deleted."
        ),
    ) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        summaries = await manager.read(
            manager.registry.list, include_deleted=include_deleted, what="listing adapters"
        )
        return {"adapters": [s.to_dict() for s in summaries]}

    @get(
        "/{adapter_id:str}",
        guards=[require("generate")],
        summary="Show an adapter: its live versions and the latest.",
        responses=ROUTE_ERRORS["show"],
    )
    async def show_adapter(self, adapter_id: str, runtime: Runtime) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        return await manager.read(
            adapter_detail, manager.registry, plain_id(adapter_id), what=f"for adapter {adapter_id}"
        )

    @get(
        "/{adapter_id:str}/versions/{version:int}",
        guards=[require("generate")],
        summary="Show one version: its record and the metadata stored in its file's header.",
        responses=ROUTE_ERRORS["show"],
    )
    async def show_version(self, adapter_id: str, version: int, runtime: Runtime) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        ref = f"{plain_id(adapter_id)}@{version}"
        return await manager.read(describe_version, manager.registry, ref, what=f"for {ref}")

    @delete(
        "/{adapter_id:str}",
        guards=[require("admin")],
        status_code=200,
        summary="Delete every live version of an adapter.",
        responses=ROUTE_ERRORS["delete"],
        description="Versions are tombstoned; their numbers are never reused.",
    )
    async def delete_adapter(self, adapter_id: str, runtime: Runtime) -> dict[str, Any]:
        return await self._delete(runtime, plain_id(adapter_id))

    @delete(
        "/{adapter_id:str}/versions/{version:int}",
        guards=[require("admin")],
        status_code=200,
        summary="Delete one version of an adapter.",
        responses=ROUTE_ERRORS["delete"],
    )
    async def delete_version(self, adapter_id: str, version: int, runtime: Runtime) -> dict[str, Any]:
        return await self._delete(runtime, f"{plain_id(adapter_id)}@{version}")

    async def _delete(self, runtime: Runtime, ref: str) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        await manager.check_store(ref.partition("@")[0])
        removed = await blocking(manager.registry.delete, ref)
        manager.deleted(removed)
        return {"deleted": [v.to_dict() for v in removed]}

    @post(
        "/{adapter_id:str}/preload",
        guards=[require("admin")],
        status_code=200,
        summary="Load an adapter into the device cache now (optionally pinned).",
        responses=ROUTE_ERRORS["preload"],
        description=(
            "`version` (latest when absent) and `pin` come from the query or a JSON body. Returns the "
            "version record and `load_s`, the seconds the load took (near 0 when already resident); "
            "`stale: true` and `X-Loraswap-Stale: adapters` when a remembered latest was used because "
            "the store did not answer."
        ),
    )
    async def preload(
        self,
        adapter_id: str,
        runtime: Runtime,
        data: PreloadRequest | None = None,
        version: int | None = Parameter(
            default=None, query="version", ge=1, description="Version; latest if absent."
        ),
        pin: bool = Parameter(default=False, query="pin", description="Never evict it."),
    ) -> Response[dict[str, Any]]:
        manager = adapter_manager(runtime)
        if data is not None:
            version = data.version if data.version is not None else version
            pin = pin or data.pin
        ref = adapter_request(plain_id(adapter_id), version, None, field="version").ref
        started = time.perf_counter()
        resolution = await manager.preload(ref, pin=pin)
        body = {
            **resolution.version.to_dict(),
            "load_s": round(time.perf_counter() - started, 6),
            "pinned": pin,
        }
        if resolution.stale:
            body["stale"] = True
        return Response(body, headers={STALE_HEADER: "adapters"} if resolution.stale else {})
