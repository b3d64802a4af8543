"""The one place where domain errors become HTTP responses.

Every error body is ``{"error": {"type", "message", "detail", "hint"?}}``. Status codes follow TGI:
overloaded → 429, validation → 422, not found → 404, incompatible → 409, too large → 413.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from adapters.errors import AdapterCorrupt, StoreError
from basemodel.errors import (
    ConfigError,
    Forbidden,
    Incompatible,
    LoraswapError,
    NotFound,
    NotReady,
    NotSupported,
    Overloaded,
    RequestTimeout,
    TooLarge,
    Unauthorized,
    ValidationFailed,
)
from service.suggest import UNKNOWN_FIELD, unknown_field

log = logging.getLogger(__name__)


class JobNotFound(NotFound):
    """No such job for this token: never made, made by another token, expired or dropped."""

    type = "job_not_found"
    hint = (
        "Job ids come from POST /v1/jobs and are kept job_ttl_s seconds after the job ends (at most "
        "max_jobs of them); only the token that made a job sees it."
    )


class JobEnded(LoraswapError):
    """A cancel of a job that has already ended."""

    type = "job_already_ended"
    hint = "The job ended before the cancel; GET /v1/jobs/{id} has its result or error."


# Most specific first: the first isinstance match wins.
STATUS_BY_ERROR: tuple[tuple[type[LoraswapError], int], ...] = (
    (ValidationFailed, 422),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Incompatible, 409),
    (JobEnded, 409),
    (TooLarge, 413),
    (Overloaded, 429),
    (NotSupported, 501),
    (NotReady, 503),
    (StoreError, 503),  # the adapter store is unreachable or failing: retry later
    (RequestTimeout, 504),
    (AdapterCorrupt, 500),  # a stored version fails its hash: typed, names the version, counted
    (ConfigError, 500),
)

# Litestar's own HTTP errors (routing, body size, malformed JSON) get stable types too.
TYPE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "overloaded",
}


def status_for(exc: LoraswapError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return HTTP_500_INTERNAL_SERVER_ERROR


def retry_after(value: Any) -> int:
    """Whole seconds for a ``Retry-After`` header: ``value`` when it is a positive number, else 1."""
    if isinstance(value, int | float) and math.isfinite(value):
        return max(1, min(math.ceil(value), 86_400))
    return 1


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    return Response(content={"error": body}, status_code=status, headers=headers or {})


def _count(request: Request[Any, Any, Any], error_type: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(type=error_type).inc()


def handle_domain_error(request: Request[Any, Any, Any], exc: LoraswapError) -> Response[dict[str, Any]]:
    status = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, NotReady):
        headers["Retry-After"] = "5"
    if isinstance(exc, StoreError):  # the breaker's remaining cool-down when it set one
        headers["Retry-After"] = str(retry_after(exc.detail.get("retry_after_s")))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    _count(request, exc.type)
    return error_response(status, exc.to_dict(), headers)


def handle_validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    problems = []
    model = _body_model(request)
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict):
            problem = {"field": item.get("key") or "body", "message": item.get("message", "")}
            if problem["message"] == UNKNOWN_FIELD:
                _explain_unknown(problem, model)
            problems.append(problem)
    if problems:
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    else:
        message = exc.detail or "invalid request"
    _count(request, "validation_error")
    body = {
        "type": "validation_error",
        "message": message,
        "detail": {"errors": problems},
        "hint": "Fix the named fields; GET /schema describes every field.",
    }
    return error_response(422, body)


def _body_model(request: Request[Any, Any, Any]) -> Any:
    """The model the route validates its body as (None when there is none)."""
    try:
        data = request.route_handler.parsed_fn_signature.parameters.get("data")
    except Exception:  # no route (404s) or a handler without a parsed signature
        return None
    return None if data is None else data.annotation


def _explain_unknown(problem: dict[str, Any], model: Any) -> None:
    """An unknown field: ``reason: unknown_field`` and, when one is close, the ``suggestion``."""
    problem["reason"] = "unknown_field"
    meant = unknown_field(model, problem["field"]) if model is not None else None
    if meant is not None:
        problem["suggestion"] = meant
        problem["message"] = f"unknown field; did you mean {meant!r}?"
    else:
        problem["message"] = "unknown field (GET /schema lists the fields)"


def handle_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status == 400:  # Litestar's 'not valid JSON' and similar: invalid input is 422 here, always
        return handle_validation_error(request, ValidationException(detail=exc.detail))
    error_type = TYPE_BY_STATUS.get(status, "http_error" if status < 500 else "internal_error")
    _count(request, error_type)
    return error_response(
        status, {"type": error_type, "message": exc.detail, "detail": {}}, dict(exc.headers or {})
    )


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    _count(request, "internal_error")
    body = {
        "type": "internal_error",
        "message": "internal server error",
        "detail": {"exception": type(exc).__name__},
        "hint": "This is a bug; the server log has the traceback.",
    }
    return error_response(500, body)


EXCEPTION_HANDLERS: dict[type[Exception], Any] = {
    LoraswapError: handle_domain_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_error,
    Exception: handle_unexpected,
}
