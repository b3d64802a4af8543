"""What ``/schema`` says about errors: every status a route can return, with the error body's schema.

Route handlers pass ``responses=ROUTE_ERRORS[kind]``. Every error body is ``ErrorBody`` (built by
``service/errors.py``). Litestar adds a 400 entry of its own to routes that validate input; this API
never answers 400 (invalid input is 422), so ``prune_openapi`` removes it from the document.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi.datastructures import ResponseSpec
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
    "(`validation_error`, `adapter_invalid`, `adapter_ref_invalid`, `json_too_deep`, `image_invalid`, "
    "`image_too_large`, `mask_size_mismatch`, …).",
    429: "The generation queue is full (`overloaded`); retry after the Retry-After header.",
    503: "Not ready yet (`not_ready`) or the adapter store is failing (`adapter_store_error`).",
    504: "The request ran past its deadline (`timeout`).",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        status: ResponseSpec(data_container=ErrorBody, description=STATUS_DESCRIPTIONS[status])
        for status in statuses
    }


ROUTE_ERRORS: dict[str, dict[int, ResponseSpec]] = {
    "generate": error_responses(401, 404, 409, 413, 422, 429, 503, 504),
    "list": error_responses(401, 422, 503),
    "show": error_responses(401, 404, 422, 503),
    "register": error_responses(401, 403, 409, 413, 422, 503),
    "delete": error_responses(401, 403, 404, 422, 503),
    "preload": error_responses(401, 403, 404, 409, 413, 422, 503),
}
"""Statuses per route kind (which errors each route's code paths raise; see docs/api.md)."""


def prune_openapi(app: Litestar) -> None:
    """Drop Litestar's generated 400 responses (this API answers invalid input with 422)."""
    for path_item in (app.openapi_schema.paths or {}).values():
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(path_item, method, None)
            if operation is not None and operation.responses:
                operation.responses.pop("400", None)
