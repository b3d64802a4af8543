"""OpenAI's images API (``POST /v1/images/generations``) translated to and from ``GenerateRequest``.

``model`` names an adapter (``watercolor``, ``watercolor@2``: LoRAX's "model = adapter id") or the
resident base model (also when absent); ``size`` is ``"WxH"`` or ``"auto"`` (the model's native size);
``n`` images use seeds ``seed + i``. ``response_format`` ``b64_json`` (the default here) returns base64
PNGs; ``url`` is 400 unless ``LORASWAP_OPENAI_DATA_URLS`` is set, which answers with ``data:`` URLs.
``quality``, ``style``, ``background``, ``moderation``, ``output_compression`` and ``user`` are accepted
and ignored; ``seed``, ``steps``, ``negative_prompt``, ``guidance_scale`` and ``scheduler`` are
loraswap's extensions (``extra_body`` in the SDK), as on ``/v1/generate``. Errors on this route have
OpenAI's shape ``{"error": {message, type, param, code}}`` (plus loraswap's ``detail`` and ``hint``) and
invalid input is 400, so the ``openai`` SDK raises ``BadRequestError``, ``AuthenticationError``,
``NotFoundError``, ``RateLimitError`` … as it does against OpenAI.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError

from adapters.errors import InvalidAdapterRef
from adapters.refs import parse_ref
from basemodel.errors import LoraswapError, ValidationFailed
from service import errors
from service.compat.errors import ModelNotFound, UnsupportedOption
from service.engine.runtime import GenerationResult
from service.openapi import OpenAIErrorInfo
from service.schemas import MAX_SEED, STRICT, GenerateRequest, SchedulerName

SIZE = re.compile(r"^(?P<w>[1-9][0-9]{0,4})x(?P<h>[1-9][0-9]{0,4})$")
MAX_IMAGES = 8


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``CreateImageRequest`` fields (unknown fields are 400, as OpenAI refuses them)."""

    model_config = STRICT

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw; <lora:…> tags work.")
    model: str | None = Field(
        None, max_length=200, description="An adapter ('watercolor', 'watercolor@2') or the base model."
    )
    n: int | None = Field(1, ge=1, le=MAX_IMAGES, description="Images; image i uses seed+i.")
    size: str | None = Field(
        None, max_length=16, pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$", description="'WxH' or 'auto'."
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default); url only with LORASWAP_OPENAI_DATA_URLS (data: URLs)."
    )
    output_format: Literal["png"] | None = Field(None, description="png only.")
    user: str | None = Field(None, max_length=256, description="Accepted, ignored.")
    quality: str | None = Field(None, max_length=32, description="Accepted, ignored.")
    style: str | None = Field(None, max_length=32, description="Accepted, ignored.")
    background: str | None = Field(None, max_length=32, description="Accepted, ignored.")
    moderation: str | None = Field(None, max_length=32, description="Accepted, ignored.")
    output_compression: int | None = Field(None, ge=0, le=100, description="Accepted, ignored.")
    stream: Literal[False] | None = Field(None, description="Streaming is not offered.")
    # loraswap's extensions (the SDK sends them with extra_body={...}); /v1/generate's rules and defaults
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="loraswap: image i uses seed+i.")
    steps: int | None = Field(None, ge=1, le=150, description="loraswap: denoising steps (20).")
    negative_prompt: str | None = Field(None, max_length=4000, description="loraswap: what to avoid.")
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="loraswap: CFG (7.5).")
    scheduler: SchedulerName | None = Field(None, description="loraswap: sampler (ddim).")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(None, description="The prompt as drawn (<lora:…> tags removed).")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


# -- request translation ---------------------------------------------------------------------------

PARAM = {"num_images": "n", "width": "size", "height": "size", "adapters": "model"}
"""GenerateRequest / server-limit field → the OpenAI parameter a client sent."""


def openai_param(field: Any) -> str | None:
    if not isinstance(field, str) or not field:
        return None
    head = field.split(".")[0]
    return PARAM.get(head, head)


def adapters_for(model: str | None, base_name: str) -> list[dict[str, Any]]:
    """``model`` → the adapters to apply: none for the base model, else one adapter reference."""
    if model is None or model in ("", base_name):
        return []
    try:
        ref = parse_ref(model)
    except InvalidAdapterRef:
        raise ModelNotFound(
            f"The model {model!r} does not exist: it is neither the base model {base_name!r} nor an "
            "adapter reference ('id' or 'id@version')",
            detail={"field": "model"},
        ) from None
    spec: dict[str, Any] = {"id": ref.adapter_id}
    if ref.version is not None:
        spec["version"] = ref.version
    return [spec]


def size_of(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    match = SIZE.match(size)
    if match is None:
        raise ValidationFailed(f"size must be 'WxH' or 'auto', got {size!r}", detail={"field": "size"})
    return int(match["w"]), int(match["h"])


def to_generate_request(req: ImageGenerationRequest, *, base_name: str, data_urls: bool) -> GenerateRequest:
    if req.response_format == "url" and not data_urls:
        raise UnsupportedOption(
            "response_format 'url' is not offered by this server; ask for 'b64_json'",
            detail={"field": "response_format"},
            hint="Send response_format='b64_json' (or start the server with LORASWAP_OPENAI_DATA_URLS=1).",
        )
    width, height = size_of(req.size)
    fields: dict[str, Any] = {
        "prompt": req.prompt,
        "width": width,
        "height": height,
        "num_images": 1 if req.n is None else req.n,
        "adapters": adapters_for(req.model, base_name),
    }
    for extension in ("seed", "steps", "negative_prompt", "guidance_scale", "scheduler"):
        if getattr(req, extension) is not None:
            fields[extension] = getattr(req, extension)
    try:
        return GenerateRequest.model_validate(fields)
    except PydanticValidationError as exc:
        problems = [
            {"field": openai_param(str(e["loc"][0])) if e["loc"] else "body", "message": e["msg"]}
            for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ValidationFailed(message, detail={"field": problems[0]["field"], "errors": problems}) from None


def to_response(req: ImageGenerationRequest, result: GenerationResult) -> ImagesResponse:
    params = result.params
    data = []
    for png in result.pngs:
        encoded = base64.b64encode(png).decode()
        if req.response_format == "url":
            data.append(ImageData(url=f"data:image/png;base64,{encoded}", revised_prompt=params.prompt))
        else:
            data.append(ImageData(b64_json=encoded, revised_prompt=params.prompt))
    return ImagesResponse(created=int(time.time()), data=data, size=f"{params.width}x{params.height}")


# -- errors in OpenAI's shape ----------------------------------------------------------------------


def reshape(response: Response[Any]) -> Response[Any]:
    """loraswap's error response → OpenAI's shape; invalid input (422) → 400, as OpenAI answers."""
    status = int(response.status_code or 500)
    body = response.content.get("error", {}) if isinstance(response.content, dict) else {}
    detail = body.get("detail") or {}
    param = detail.get("field")
    if param is None and detail.get("errors"):
        param = detail["errors"][0].get("field")
    info = OpenAIErrorInfo(
        message=str(body.get("message", "")),
        type="server_error" if status >= 500 else "invalid_request_error",
        param=openai_param(param),
        code=body.get("type"),
        detail=detail,
        hint=body.get("hint"),
    )
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(
        content={"error": info.model_dump()},
        status_code=400 if status == 422 else status,
        headers=headers,
    )


def on_domain_error(request: Request[Any, Any, Any], exc: LoraswapError) -> Response[Any]:
    return reshape(errors.handle_domain_error(request, exc))


def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    return reshape(errors.handle_validation_error(request, exc))


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return reshape(errors.handle_http_error(request, exc))


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return reshape(errors.handle_unexpected(request, exc))


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    LoraswapError: on_domain_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_error,
    Exception: on_unexpected,
}
