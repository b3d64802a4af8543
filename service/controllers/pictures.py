"""``GET /v1/adapters/{id}/versions/{v}/pictures/{index}``: a picture a version carries, as stored.

The content type is the one Pillow found when the picture was registered (``adapters/pictures.py``),
with ``nosniff`` and a ``sandbox`` CSP so a browser never treats the bytes as anything but an image.
The bytes are checked against the sha256 in the version record. Scope ``generate``, like the record.
"""

from __future__ import annotations

from litestar import Controller, Response, get

from adapters.pictures import Picture
from adapters.registry import Registry
from service.auth import require
from service.controllers.adapters import adapter_manager, plain_id
from service.engine.runtime import Runtime
from service.openapi import ROUTE_ERRORS

PICTURE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Content-Disposition": "inline",
    "Cache-Control": "private, max-age=86400, immutable",  # content-addressed: never changes
}


def read_picture(registry: Registry, ref: str, index: int) -> tuple[Picture, bytes]:
    return registry.read_picture(registry.resolve(ref), index)


class PictureController(Controller):
    path = "/v1/adapters"
    tags = ["adapters"]
    guards = [require("generate")]

    @get(
        "/{adapter_id:str}/versions/{version:int}/pictures/{index:int}",
        summary="A picture of an adapter version (preview, loss curve or sample grid).",
        description=(
            "`index` is the picture's position in the version's `pictures` list (from 0). The body is "
            "the image as registered, `Content-Type` image/png, image/jpeg or image/webp. 404 "
            "`adapter_not_found` (reason `unknown_picture`) past the list's end."
        ),
        responses=ROUTE_ERRORS["picture"],
        media_type="image/png",
    )
    async def picture(self, adapter_id: str, version: int, index: int, runtime: Runtime) -> Response[bytes]:
        manager = adapter_manager(runtime)
        ref = f"{plain_id(adapter_id)}@{version}"
        picture, data = await manager.read(
            read_picture, manager.registry, ref, index, what=f"for a picture of {ref}"
        )
        return Response(data, media_type=picture.media_type, headers=PICTURE_HEADERS)
