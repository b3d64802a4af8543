"""What ``/schema`` says about errors: every status a route can return, with the error body's schema.

Route handlers pass ``responses=ROUTE_ERRORS[kind]``. Every error body is ``ErrorBody`` (built by
``service/errors.py``). Litestar adds a 400 entry of its own to routes that validate input; this API
never answers 400 (invalid input is 422), so ``prune_openapi`` removes it from the document.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Schema
from pydantic import BaseModel, Field


class ErrorInfo(BaseModel):
    type: str = Field(description="Stable error type, e.g. 'validation_error', 'adapter_not_found'.")
    message: str = Field(description="What went wrong, for people.")
    detail: dict[str, Any] = Field(description="Machine-readable specifics: field, reason, limit …")
    hint: str | None = Field(None, description="What to do about it.")


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {type, message, detail, hint?}}``."""

    error: ErrorInfo


STATUS_DESCRIPTIONS: dict[int, str] = {
    401: "Missing or invalid bearer token (`unauthorized`; only when tokens are configured).",
    403: "The token lacks the 'admin' scope (`forbidden`).",
    404: "Unknown adapter id or version, or a deleted version (`adapter_not_found`).",
    409: "The adapter does not fit the resident base model (`adapter_incompatible`).",
    413: "The body, the adapter file, its header or its metadata is over a limit "
    "(`payload_too_large`, `adapter_too_large`).",
    422: "Invalid input: a field, a file, an id, JSON nested too deep, an unusable input image "
    "(`validation_error`, `adapter_invalid`, `adapter_not_safetensors`, `adapter_unsafe_format`, "
    "`adapter_ref_invalid`, `json_too_deep`, `image_invalid`, "
    "`image_too_large`, `mask_size_mismatch`, …).",
    400: "Invalid input.",
    429: "The generation queue is full (`overloaded`); retry after the Retry-After header.",
    500: "A stored adapter version is corrupt (`adapter_corrupt`: its file fails its recorded hash, or "
    "is missing); nothing is served from it, `detail` names the version, `loraswap adapters verify` "
    "lists every such version.",
    503: "Not ready yet (`not_ready`) or the adapter store is failing (`adapter_store_error`).",
    504: "The request ran past its deadline (`timeout`).",
}


JOB_DESCRIPTIONS: dict[int, str] = {
    404: "No such job for this token: unknown, another token's, expired or dropped (`job_not_found`).",
    409: "The job had already ended; nothing was cancelled (`job_already_ended`).",
}


def error_responses(
    *statuses: int, body: type[BaseModel] = ErrorBody, descriptions: dict[int, str] | None = None
) -> dict[int, ResponseSpec]:
    described = {**STATUS_DESCRIPTIONS, **(descriptions or {})}
    return {status: ResponseSpec(data_container=body, description=described[status]) for status in statuses}


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str = Field(description="'invalid_request_error' (4xx) or 'server_error' (5xx).")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str | None = Field(description="loraswap's stable error type, e.g. 'adapter_not_found'.")
    detail: dict[str, Any] = Field(default_factory=dict)
    hint: str | None = None


class OpenAIErrorBody(BaseModel):
    """Every error of ``/v1/images/generations``: OpenAI's ``{"error": {message, type, param, code}}``."""

    error: OpenAIErrorInfo


SDAPI_DESCRIPTIONS = {
    401: "Missing or invalid token (`unauthorized`): a bearer token, or HTTP basic auth with the token as "
    "the password.",
    404: "Unknown sampler (`sampler_not_found`) or checkpoint (`model_not_found`), unknown adapter in a "
    "`<lora:…>` tag (`adapter_not_found`).",
    422: "Invalid input (`validation_error`, `json_too_deep`, …), an option that is not implemented "
    "(`unsupported_option`), img2img on a build without it (`img2img_unavailable`).",
}
OPENAI_DESCRIPTIONS = {
    400: "Invalid input: a field, the size, n, an unsupported response_format (OpenAI's "
    "`invalid_request_error`; `code` is loraswap's type).",
    401: "Missing or invalid API key (the bearer token; `code: unauthorized`).",
    404: "Unknown model: neither the base model nor a registered adapter (`model_not_found`, "
    "`adapter_not_found`).",
    413: "The body is over the size limit (`payload_too_large`).",
}


ROUTE_ERRORS: dict[str, dict[int, ResponseSpec]] = {
    "generate": error_responses(401, 404, 409, 413, 422, 429, 500, 503, 504),
    "list": error_responses(401, 422, 503),
    "show": error_responses(401, 404, 422, 503),
    "register": error_responses(401, 403, 409, 413, 422, 503),
    "delete": error_responses(401, 403, 404, 422, 503),
    "preload": error_responses(401, 403, 404, 409, 413, 422, 500, 503),
    "job_submit": error_responses(401, 404, 409, 413, 422, 429, 500, 503),
    "job": error_responses(401, 404, descriptions=JOB_DESCRIPTIONS),
    "server": error_responses(401),
    "picture": error_responses(401, 404, 422, 503),
    "job_cancel": error_responses(401, 404, 409, descriptions=JOB_DESCRIPTIONS),
    "sdapi_generate": error_responses(
        401, 404, 409, 413, 422, 429, 503, 504, descriptions=SDAPI_DESCRIPTIONS
    ),
    "sdapi_store": error_responses(401, 503, descriptions=SDAPI_DESCRIPTIONS),
    "sdapi_model": error_responses(401, 503, descriptions=SDAPI_DESCRIPTIONS),
    "sdapi_static": error_responses(401, descriptions=SDAPI_DESCRIPTIONS),
    "sdapi_progress": error_responses(401, 422, descriptions=SDAPI_DESCRIPTIONS),
    "sdapi_options": error_responses(401, 404, 413, 422, 503, descriptions=SDAPI_DESCRIPTIONS),
    "openai_images": error_responses(
        400, 401, 404, 409, 413, 429, 503, 504, body=OpenAIErrorBody, descriptions=OPENAI_DESCRIPTIONS
    ),
}
"""Statuses per route kind (which errors each route's code paths raise; see docs/api.md)."""


KEEPS_400 = ("/v1/images/",)
"""Routes that answer invalid input with 400 (OpenAI's convention) and document it themselves."""


IMAGE_ROUTES = {
    "/v1/adapters/{adapter_id}/versions/{version}/pictures/{index}": (
        "image/png",
        "image/jpeg",
        "image/webp",
    ),
}
"""Routes whose 200 body is an image, and the media types it may have."""


def _document_images(path: str, operation: Any) -> None:
    media_types = IMAGE_ROUTES.get(path)
    ok = operation.responses.get("200") if operation.responses else None
    if media_types is None or not isinstance(ok, OpenAPIResponse):
        return
    binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
    ok.description = f"The image as registered ({', '.join(media_types)})."
    ok.content = {media_type: OpenAPIMediaType(schema=binary) for media_type in media_types}


def prune_openapi(app: Litestar) -> None:
    """Drop Litestar's generated 400 responses (this API answers invalid input with 422); document
    image bodies with every media type they may have."""
    for path, path_item in (app.openapi_schema.paths or {}).items():
        for method in ("get",):
            operation = getattr(path_item, method, None)
            if operation is not None:
                _document_images(path, operation)
        if path.startswith(KEEPS_400):
            continue
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(path_item, method, None)
            if operation is not None and operation.responses:
                operation.responses.pop("400", None)
