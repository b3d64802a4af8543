"""``/v1/adapters``: register, list, show, delete and preload LoRA adapters over HTTP.

Registry and store I/O is blocking, so every call into it runs on a worker thread
(``anyio.to_thread``); the event loop only moves bytes. Registration accepts either a
``multipart/form-data`` upload or a JSON body naming an ``s3://`` object. The upload route sets no
Litestar body limit of its own: it parses the multipart stream itself and enforces
``max_adapter_bytes`` on the file part (and ``max_body_bytes`` on the text fields) while the bytes
arrive, with an early check of ``Content-Length``, so an oversized upload is refused with 413 before
it is read. The file part is spooled to a temporary file, never held whole in memory while it arrives.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio.to_thread
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
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
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from adapters.errors import AdapterCorrupt, AdapterTooLarge, AdapterUnsafeFormat, StoreError
from adapters.format import PICKLE_SUFFIXES, read_limited
from adapters.metadata import AdapterMetadata, coerce_metadata, parse_header_metadata
from adapters.records import AdapterVersion, blob_key, version_key
from adapters.refs import validate_id
from adapters.registry import Registry
from adapters.sources import KeyMissing, LocalStore, Store
from adapters.sources.s3 import S3Store
from basemodel.errors import LoraswapError, NotReady, TooLarge, ValidationFailed
from service.auth import require
from service.engine.runtime import Runtime
from service.errors import status_for
from service.lora.worker_manager import AdapterManager

T = TypeVar("T")

MULTIPART = "multipart/form-data"
JSON = "application/json"
FORM_FIELDS = frozenset({"file", "id", "metadata", "scale_default"})
MAX_FORM_PARTS = 8
FORM_OVERHEAD = 64 << 10  # part headers and boundaries on top of the file and the text fields
SPOOL_FLUSH = 1 << 20  # write the upload to its temporary file in 1 MiB blocks (on a thread)
HEADER_PROBE = 256 << 10  # first ranged read of a blob's safetensors header
S3_CONFIG = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking registry / store work on a worker thread."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))


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

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Adapter id, ^[a-z0-9][a-z0-9._-]{0,63}$.", examples=["watercolor"])
    source: str = Field(description="s3://bucket/key of a .safetensors file.", examples=["s3://b/k"])
    metadata: dict[str, Any] | None = Field(None, description="AdapterMetadata fields (docs/adapters.md).")
    scale_default: float | None = Field(None, description="Weight used when a request gives none.")


class PreloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, description="Version to load; latest when absent.")
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


@dataclass
class Upload:
    """A parsed multipart registration: text fields, and the file part spooled to ``path``."""

    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    filename: str | None = None
    size: int = 0

    def cleanup(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _too_large_body(limit: int) -> TooLarge:
    return TooLarge(f"request body exceeds the {limit}-byte limit", detail={"limit": limit})


def _file_too_large(limit: int) -> AdapterTooLarge:
    return AdapterTooLarge(
        f"adapter exceeds the {limit}-byte limit", reason="file_too_large", detail={"limit": limit}
    )


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes: announced or actually received."""
    if (request.content_length or 0) > limit:
        raise _too_large_body(limit)
    parts: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large_body(limit)
        parts.append(chunk)
    return b"".join(parts)


async def read_upload(
    request: Request[Any, Any, Any], boundary: str | None, *, max_file_bytes: int, max_field_bytes: int
) -> Upload:
    """Stream-parse ``multipart/form-data``: the ``file`` part to a temporary file, the rest as text."""
    if not boundary:
        raise ValidationFailed("multipart boundary missing in Content-Type", detail={"field": "body"})
    total_limit = max_file_bytes + max_field_bytes + FORM_OVERHEAD
    if (request.content_length or 0) > total_limit:
        raise _file_too_large(max_file_bytes)
    upload = Upload()
    handle: IO[bytes] | None = None
    pending = bytearray()
    text = bytearray()
    text_total = 0
    segment: MultipartSegment | None = None
    received = 0
    try:
        with PushMultipartParser(boundary.encode(), max_segment_count=MAX_FORM_PARTS) as parser:
            async for chunk in request.stream():
                received += len(chunk)
                if received > total_limit:
                    raise _file_too_large(max_file_bytes)
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment = event
                        if segment.name not in FORM_FIELDS:
                            raise ValidationFailed(
                                f"unexpected form field {segment.name!r}",
                                detail={"field": segment.name, "allowed": sorted(FORM_FIELDS)},
                            )
                        if segment.name in upload.fields or (segment.name == "file" and upload.path):
                            raise ValidationFailed(
                                f"form field {segment.name!r} is given twice", detail={"field": segment.name}
                            )
                        if segment.name == "file":
                            handle = await blocking(_open_spool, upload, segment.filename)
                    elif event is not None:  # a block of the current part's body
                        assert segment is not None
                        if segment.name == "file":
                            upload.size += len(event)
                            if upload.size > max_file_bytes:
                                raise _file_too_large(max_file_bytes)
                            pending += event
                            if len(pending) >= SPOOL_FLUSH and handle is not None:
                                await blocking(handle.write, bytes(pending))
                                pending.clear()
                        else:
                            text_total += len(event)
                            if text_total > max_field_bytes:
                                raise _too_large_body(max_field_bytes)
                            text += event
                    else:  # end of the current part
                        assert segment is not None
                        if segment.name == "file" and handle is not None:
                            await blocking(_finish_spool, handle, bytes(pending))
                            pending.clear()
                            handle = None
                        elif segment.name != "file":
                            upload.fields[segment.name] = _decode_field(segment.name, bytes(text))
                            text.clear()
                        segment = None
                if parser.closed:
                    break
            if not parser.closed:
                parser.close()  # raises ParserError for a stream that ended early
    except (ParserError, ParserLimitReached) as exc:
        if handle is not None:
            handle.close()
        upload.cleanup()
        raise ValidationFailed(f"invalid multipart/form-data: {exc}", detail={"field": "body"}) from None
    except BaseException:
        if handle is not None:
            handle.close()
        upload.cleanup()
        raise
    return upload


def _open_spool(upload: Upload, filename: str | None) -> IO[bytes]:
    if filename and Path(filename).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterUnsafeFormat(
            f"refusing pickle file {Path(filename).name}: only .safetensors adapters are accepted",
            reason="pickle",
        )
    fd, name = tempfile.mkstemp(prefix="loraswap-upload-", suffix=".safetensors")
    upload.path = Path(name)
    upload.filename = filename
    return os.fdopen(fd, "wb")


def _finish_spool(handle: IO[bytes], tail: bytes) -> None:
    with handle:
        handle.write(tail)


def _decode_field(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(f"form field {name!r} is not UTF-8 text", detail={"field": name}) from None


def upload_arguments(upload: Upload) -> tuple[str, str | None, float | None]:
    """(id, metadata JSON, scale_default) from the form's text fields."""
    if upload.path is None:
        raise ValidationFailed("the form has no 'file' part", detail={"field": "file"})
    adapter_id = upload.fields.get("id")
    if not adapter_id:
        raise ValidationFailed("the form has no 'id' field", detail={"field": "id"})
    metadata = upload.fields.get("metadata") or None
    raw_scale = (upload.fields.get("scale_default") or "").strip()
    try:
        scale = float(raw_scale) if raw_scale else None
    except ValueError:
        raise ValidationFailed(
            f"scale_default {raw_scale!r} is not a number", detail={"field": "scale_default"}
        ) from None
    return adapter_id, metadata, scale


# -- S3 sources -------------------------------------------------------------------------------------

_s3_clients: dict[str | None, Any] = {}
_s3_lock = threading.Lock()


def s3_client(endpoint_url: str | None) -> Any:
    """One boto3 S3 client per endpoint (``None``: boto3's own AWS_ENDPOINT_URL / default)."""
    with _s3_lock:  # boto3 clients are thread-safe; creating them is not
        client = _s3_clients.get(endpoint_url)
        if client is None:
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=S3_CONFIG)
            _s3_clients[endpoint_url] = client
        return client


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key). Any other scheme is refused (no http://, no file://)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key or key.endswith("/"):
        raise ValidationFailed(
            "source must be an s3://bucket/key URI of a .safetensors file",
            detail={"field": "source", "reason": "bad_source"},
            hint="Only s3:// sources are fetched; upload other files as multipart/form-data.",
        )
    return bucket, key


def fetch_s3(uri: str, endpoint_url: str | None, max_bytes: int) -> bytes:
    """The object's bytes, size-checked with HeadObject before anything is downloaded (blocking)."""
    bucket, key = parse_s3_uri(uri)
    if Path(key).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterUnsafeFormat(f"refusing pickle file {key}", reason="pickle")
    client = s3_client(endpoint_url)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        if size > max_bytes:
            raise AdapterTooLarge(
                f"{uri} is {size} bytes, over the {max_bytes}-byte limit",
                reason="file_too_large",
                detail={"size": size, "limit": max_bytes},
            )
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return read_limited(body, max_bytes)
        finally:
            body.close()
    except ClientError as exc:
        raise _source_error(uri, exc) from None
    except BotoCoreError as exc:
        raise StoreError(
            f"fetching {uri} failed: {exc}", reason="s3_error", detail={"code": type(exc).__name__}
        ) from None


def _source_error(uri: str, exc: ClientError) -> LoraswapError:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(error.get("Code") or status)
    if status in (403, 404) or code in {"NoSuchKey", "NoSuchBucket", "NotFound", "AccessDenied", "Forbidden"}:
        return ValidationFailed(
            f"cannot read {uri}: {code}",
            detail={"field": "source", "reason": "source_unreadable", "code": code},
            hint="Check the bucket, the key and the server's S3 credentials.",
        )
    return StoreError(f"fetching {uri} failed: {exc}", reason="s3_error", detail={"code": code})


# -- registration -----------------------------------------------------------------------------------


class CreateRecorder:
    """A store proxy recording the keys this registration created.

    ``Registry.register`` returns the existing version for identical content; whether *this* call
    created the version is known only from whether its atomic create of the record succeeded.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.created: set[str] = set()

    @property
    def uri(self) -> str:
        return self.store.uri

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        made = self.store.create(key, data)
        if made:
            self.created.add(key)
        return made

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.store.list(prefix)

    def delete(self, key: str) -> None:
        self.store.delete(key)


def register(
    registry: Registry,
    source: bytes | Path,
    adapter_id: str,
    metadata: dict[str, Any] | str | None,
    scale_default: float | None,
) -> tuple[AdapterVersion, bool]:
    """Register through the server's registry; (version, whether this call created it). Blocking."""
    recorder = CreateRecorder(registry.store)
    scoped = Registry(
        recorder,
        registry.base,
        strict_base=registry.strict_base,
        max_rank=registry.max_rank,
        limits=registry.limits,
    )
    version = scoped.register(source, adapter_id, coerce_metadata(metadata), scale_default=scale_default)
    return version, version_key(version.adapter_id, version.version) in recorder.created


# -- reading -----------------------------------------------------------------------------------------


def adapter_detail(registry: Registry, adapter_id: str) -> dict[str, Any]:
    versions = registry.versions(adapter_id)
    if not versions:
        versions = [registry.resolve(adapter_id)]  # raises the right 404 (unknown id / all deleted)
    return {
        "adapter_id": adapter_id,
        "latest": versions[-1].to_dict(),
        "versions": [v.to_dict() for v in versions],
    }


def header_bytes(store: Store, key: str, max_header_bytes: int) -> bytes:
    """The JSON header of a stored safetensors blob, reading as little of the blob as the store allows."""
    if isinstance(store, LocalStore):
        try:
            with open(store._path(key), "rb") as fh:  # the store's own key and root checks
                head = fh.read(8)
                size = _header_size(head, max_header_bytes)
                return fh.read(size)
        except FileNotFoundError:
            raise KeyMissing(key) from None
    if isinstance(store, S3Store):
        full = store._key(key)  # the store's own key check and prefix
        try:
            first = _s3_range(store, full, 0, HEADER_PROBE)
            size = _header_size(first[:8], max_header_bytes)
            if 8 + size <= len(first):
                return first[8 : 8 + size]
            return first[8:] + _s3_range(store, full, len(first), 8 + size)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                raise KeyMissing(key) from None
            raise StoreError(f"S3 read of {key} failed: {exc}", reason="s3_error") from None
        except BotoCoreError as exc:
            raise StoreError(f"S3 read of {key} failed: {exc}", reason="s3_error") from None
    data = store.get(key)
    return data[8 : 8 + _header_size(data[:8], max_header_bytes)]


def _s3_range(store: S3Store, key: str, start: int, stop: int) -> bytes:
    response = store.client.get_object(Bucket=store.bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
    return bytes(response["Body"].read())


def _header_size(head: bytes, max_header_bytes: int) -> int:
    if len(head) < 8:
        raise AdapterCorrupt("the stored file is truncated", reason="bad_header")
    size = int.from_bytes(head[:8], "little")
    if size > max_header_bytes:
        raise AdapterCorrupt("the stored file's header is over the limit", reason="bad_header")
    return size


def version_metadata(registry: Registry, version: AdapterVersion) -> AdapterMetadata:
    """The ``loraswap`` metadata in the blob's header; only the header is read (not sha256-verified)."""
    try:
        raw = header_bytes(registry.store, blob_key(version.sha256), registry.limits.max_header_bytes)
    except KeyMissing:
        raise AdapterCorrupt(
            f"the file of {version.ref} is missing from the store", reason="blob_missing"
        ) from None
    try:
        header = json.loads(raw)
        entries = header.get("__metadata__") or {}
        if not isinstance(entries, dict):
            raise ValueError("__metadata__ is not an object")
        return parse_header_metadata(entries) or AdapterMetadata()
    except (ValueError, AttributeError, LoraswapError) as exc:
        raise AdapterCorrupt(
            f"the stored header of {version.ref} is unreadable: {exc}", reason="bad_header"
        ) from None


def describe_version(registry: Registry, ref: str) -> dict[str, Any]:
    version = registry.resolve(ref)
    metadata = version_metadata(registry, version)
    return {**version.to_dict(), "metadata": metadata.model_dump(mode="json", exclude_none=True)}


def _string(description: str, **kwargs: Any) -> Schema:
    return Schema(type=OpenAPIType.STRING, description=description, **kwargs)


@dataclass
class RegisterOperation(Operation):
    """OpenAPI for the register route, which reads its body itself: both accepted encodings."""

    def __post_init__(self) -> None:
        id_schema = _string("Adapter id.", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
        scale = Schema(type=OpenAPIType.NUMBER, description="Weight used when a request gives none.")
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
        summary="Register an adapter version.",
        description=(
            "Either `multipart/form-data` with `file` (a LoRA .safetensors), `id`, optional `metadata` "
            "(JSON text) and `scale_default`, or JSON `{id, source: 's3://bucket/key', metadata?, "
            "scale_default?}`. 201 with the new version record and `created: true`; 200 with "
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
                )
                try:
                    adapter_id, metadata, scale = upload_arguments(upload)
                    assert upload.path is not None
                    version, created = await blocking(
                        register, manager.registry, upload.path, adapter_id, metadata, scale
                    )
                finally:
                    await blocking(upload.cleanup)
            elif content_type == JSON:
                raw = await read_body(request, settings.max_body_bytes)
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise ValidationFailed("the body is not valid JSON", detail={"field": "body"}) from None
                spec: RegisterFromSource = validated(RegisterFromSource, body)
                parse_s3_uri(spec.source)
                data = await blocking(
                    fetch_s3, spec.source, settings.s3_endpoint_url, settings.max_adapter_bytes
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
        return Response(
            {**version.to_dict(), "created": created},
            status_code=201 if created else 200,
            headers={"Location": f"/v1/adapters/{version.adapter_id}/versions/{version.version}"},
        )

    @get(
        "/",
        guards=[require("generate")],
        summary="List adapters.",
        description="Every adapter id with its latest live version and version counts.",
    )
    async def list_adapters(
        self,
        runtime: Runtime,
        include_deleted: bool = Parameter(
            default=False, description="Also list ids whose versions are all deleted."
        ),
    ) -> dict[str, Any]:
        registry = adapter_manager(runtime).registry
        summaries = await blocking(registry.list, include_deleted=include_deleted)
        return {"adapters": [s.to_dict() for s in summaries]}

    @get(
        "/{adapter_id:str}",
        guards=[require("generate")],
        summary="Show an adapter: its live versions and the latest.",
    )
    async def show_adapter(self, adapter_id: str, runtime: Runtime) -> dict[str, Any]:
        registry = adapter_manager(runtime).registry
        return await blocking(adapter_detail, registry, plain_id(adapter_id))

    @get(
        "/{adapter_id:str}/versions/{version:int}",
        guards=[require("generate")],
        summary="Show one version: its record and the metadata stored in its file's header.",
    )
    async def show_version(self, adapter_id: str, version: int, runtime: Runtime) -> dict[str, Any]:
        registry = adapter_manager(runtime).registry
        return await blocking(describe_version, registry, f"{plain_id(adapter_id)}@{version}")

    @delete(
        "/{adapter_id:str}",
        guards=[require("admin")],
        status_code=200,
        summary="Delete every live version of an adapter.",
        description="Versions are tombstoned; their numbers are never reused.",
    )
    async def delete_adapter(self, adapter_id: str, runtime: Runtime) -> dict[str, Any]:
        return await self._delete(runtime, plain_id(adapter_id))

    @delete(
        "/{adapter_id:str}/versions/{version:int}",
        guards=[require("admin")],
        status_code=200,
        summary="Delete one version of an adapter.",
    )
    async def delete_version(self, adapter_id: str, version: int, runtime: Runtime) -> dict[str, Any]:
        return await self._delete(runtime, f"{plain_id(adapter_id)}@{version}")

    async def _delete(self, runtime: Runtime, ref: str) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        removed = await blocking(manager.registry.delete, ref)
        if removed:
            adapter_id = removed[0].adapter_id
            numbers = {v.version for v in removed}
            manager.cache.drop(lambda key: key[0] == adapter_id and key[1] in numbers)
        return {"deleted": [v.to_dict() for v in removed]}

    @post(
        "/{adapter_id:str}/preload",
        guards=[require("admin")],
        status_code=200,
        summary="Load an adapter into the device cache now (optionally pinned).",
        description=(
            "`version` (latest when absent) and `pin` come from the query or a JSON body. Returns the "
            "version record and `load_s`, the seconds the load took (near 0 when already resident)."
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
    ) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        plain_id(adapter_id)
        if data is not None:
            version = data.version if data.version is not None else version
            pin = pin or data.pin
        ref = f"{adapter_id}@{version}" if version is not None else adapter_id
        started = time.perf_counter()
        loaded = await blocking(manager.preload, ref, pin=pin)
        return {**loaded.to_dict(), "load_s": round(time.perf_counter() - started, 6), "pinned": pin}
