"""Request bodies: Litestar's ``Request`` with loraswap's JSON depth limit in front of its decoder, and
the multipart form variant of the generation routes.

Litestar decodes JSON bodies with msgspec, which raises ``RecursionError`` (a 500) on deeply nested
input; ``CheckedRequest.json`` scans the raw body first (``basemodel.jsonlimits``) and refuses it with
422 ``json_too_deep``. Routes that read their body themselves use ``basemodel.jsonlimits.loads``.

A JSON route may also be sent ``multipart/form-data`` (``curl -F``): a ``request`` part holding the JSON
object, and file parts ``init_image`` / ``mask_image`` whose bytes stand for the base64 strings of the
same names. The form becomes that JSON object before validation, so the route validates, limits and
errs exactly as for JSON (the body limit ``max_body_bytes`` covers the whole form). Any other part, a
part given twice, or an image given both as a part and in ``request`` is 422.
"""

from __future__ import annotations

import base64
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile

from basemodel.errors import ValidationFailed
from basemodel.jsonlimits import check_json_depth, loads

MULTIPART = "multipart/form-data"
REQUEST_PART = "request"
IMAGE_PARTS = ("init_image", "mask_image")
HINT = "Send a 'request' part with the JSON body and optional 'init_image' / 'mask_image' file parts."


class CheckedRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        if self.content_type[0] == MULTIPART:
            return await form_as_json(self)
        check_json_depth(await self.body(), what="the request body", field="body")
        return await super().json()


def _refuse(message: str, field: str) -> ValidationFailed:
    return ValidationFailed(message, detail={"field": field}, hint=HINT)


async def _part_bytes(value: Any) -> bytes:
    if isinstance(value, UploadFile):
        data: bytes = await value.read()
        return data
    return str(value).encode()


async def form_as_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The multipart form as the JSON object it stands for (see the module docstring)."""
    form = await request.form()
    seen: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name not in (REQUEST_PART, *IMAGE_PARTS):
            raise _refuse(f"unknown form part {name!r}", name)
        if name in seen:
            raise _refuse(f"form part {name!r} is given twice", name)
        seen[name] = value
    if REQUEST_PART not in seen:
        raise _refuse("the form has no 'request' part", REQUEST_PART)
    raw = await _part_bytes(seen[REQUEST_PART])
    body = loads(raw, what="the 'request' part", field=REQUEST_PART)
    if not isinstance(body, dict):
        raise _refuse("the 'request' part must be a JSON object", REQUEST_PART)
    for name in IMAGE_PARTS:
        if name not in seen:
            continue
        if name in body:
            raise _refuse(f"{name} is given both as a form part and in 'request'", name)
        value = seen[name]
        if isinstance(value, UploadFile):
            body[name] = base64.b64encode(await value.read()).decode()
        else:  # a text part: already base64 (or a data: URL)
            body[name] = str(value)
    return body
