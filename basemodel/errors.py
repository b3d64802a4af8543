"""The one domain error hierarchy shared by every loraswap package.

Each error carries a stable ``type`` string that clients can match on, a human message, an optional
``detail`` mapping and a ``hint`` that says what to do about it. HTTP status codes are assigned in
exactly one place (``service/errors.py``); nothing here knows about HTTP.
"""

from __future__ import annotations

from typing import Any


class LoraswapError(Exception):
    """Root of all expected, user-facing errors."""

    type: str = "internal_error"
    hint: str = ""

    def __init__(
        self, message: str, *, detail: dict[str, Any] | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})
        if hint is not None:
            self.hint = hint

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "message": self.message, "detail": self.detail}
        if self.hint:
            body["hint"] = self.hint
        return body


class ValidationFailed(LoraswapError):
    """The input is well-formed transport-wise but its content is invalid."""

    type = "validation_error"
    hint = "Fix the field named in detail and retry."


class JSONTooDeep(ValidationFailed):
    """JSON nested deeper than ``basemodel.jsonlimits.MAX_JSON_DEPTH``, refused before it is parsed."""

    type = "json_too_deep"
    hint = "Send JSON nested at most 64 levels deep (docs/reliability.md, 'Hostile input')."


class ImageInvalid(ValidationFailed):
    """An ``init_image`` / ``mask_image`` that is not a usable picture: bad base64, bytes no decoder
    reads, a format other than PNG/JPEG/WebP, a truncated file or an unsupported pixel mode
    (``detail.reason``)."""

    type = "image_invalid"
    hint = "Send a PNG, JPEG or WebP file, base64-encoded (a data: URL prefix is allowed)."


class ImageTooLarge(ValidationFailed):
    """An input image over a server limit: encoded bytes, pixel count (read from the header before any
    pixel is decoded, so decompression bombs cost nothing) or the output size it implies."""

    type = "image_too_large"
    hint = "Send a smaller image, or ask for a width and height within the server's limits."


class LimitExceeded(ValidationFailed):
    """A request over one of the server's limits (size, pixels, steps, images, or their product, the
    cost): ``detail`` names the ``field``, the ``limit`` (its setting and value) and the request's
    ``value``."""

    type = "limit_exceeded"
    hint = "Ask for less (GET /readyz lists the limits), or raise the setting named in detail.setting."


class MaskMismatch(ValidationFailed):
    """A ``mask_image`` whose size differs from ``init_image``'s."""

    type = "mask_size_mismatch"
    hint = "Send a mask of exactly the init image's width and height (white = repaint)."


class Unsupported(ValidationFailed):
    """A valid request the base model's family cannot do (image-to-image on a family without it)."""

    type = "unsupported"


class UnsafeFormat(ValidationFailed):
    """A file in a format we refuse to open (pickle checkpoints, unknown containers)."""

    type = "unsafe_format"
    hint = "Convert the file to .safetensors; pickle files (.ckpt/.pt/.bin) are never loaded."


class NotFound(LoraswapError):
    type = "not_found"


class Incompatible(LoraswapError):
    """Something (an adapter, a checkpoint) does not fit the resident base model."""

    type = "incompatible"


class TooLarge(LoraswapError):
    type = "payload_too_large"
    hint = "Send a smaller payload or raise the limit in the settings."


class Overloaded(LoraswapError):
    type = "overloaded"
    hint = "The queue is full; retry after the number of seconds in the Retry-After header."

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
        self.detail.setdefault("retry_after_s", retry_after_s)


class NotReady(LoraswapError):
    type = "not_ready"
    hint = "The model is still loading; poll GET /readyz and retry."


class RequestTimeout(LoraswapError):
    type = "timeout"
    hint = "Ask for fewer steps, fewer images or a smaller size, or raise request_timeout_s."


class Unauthorized(LoraswapError):
    type = "unauthorized"
    hint = "Send 'Authorization: Bearer <token>' with a token configured on the server."


class Forbidden(LoraswapError):
    type = "forbidden"
    hint = "This route needs a token with the 'admin' scope."


class NotSupported(LoraswapError):
    """A feature the API reserves but this build does not provide yet."""

    type = "not_implemented"


class ConfigError(LoraswapError):
    """Settings or command-line options that cannot work together."""

    type = "config_error"


class BaseModelError(LoraswapError):
    """The base model cannot be found, built or loaded."""

    type = "base_model_error"


class MissingComponents(BaseModelError):
    """A single-file checkpoint lacks pipeline components (text encoders, VAE, tokenizers) and no
    diffusers folder was named to supply them (``--base-components``)."""

    type = "base_model_components_missing"
