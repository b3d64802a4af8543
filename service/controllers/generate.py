"""``POST /v1/generate``: text-to-image, image-to-image and inpainting on the resident model.

``run_generation`` is the one code path of a generation — server limits, admission (429), adapter
resolution and leases, the queue, batching, the deadline and the client's disconnect. The A1111
(``/sdapi/v1/*``) and OpenAI (``/v1/images/generations``) routes translate their bodies into a
``GenerateRequest`` and call it too; only the response shapes differ.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.status_codes import HTTP_200_OK

from basemodel.errors import ValidationFailed
from service.auth import require
from service.engine.runtime import GenerationResult, Runtime, Work
from service.lora.resolver import STALE_HEADER
from service.openapi import ROUTE_ERRORS
from service.schemas import GenerateRequest, GenerateResponse

PNG = "image/png"
CLIENT_CLOSED = 499  # client closed request (nginx's convention)


def wants_png(request: Request[Any, Any, Any]) -> bool:
    accept = request.headers.get("accept", "")
    return PNG in accept and "application/json" not in accept


async def wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    """Returns once the client has closed the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_generation(
    data: GenerateRequest, request: Request[Any, Any, Any], runtime: Runtime
) -> tuple[Work, GenerationResult | None]:
    """Admit, resolve adapters, queue and wait: the work and its result (``None``: the client left)."""
    work = await runtime.prepare(data)
    try:
        result = await runtime.generate(work, lambda: wait_for_disconnect(request))
    finally:
        runtime.release(work)
    return work, result


def generation_headers(work: Work) -> dict[str, str]:
    """``X-Loraswap-Seed`` and, when a remembered 'latest' was served, ``X-Loraswap-Stale``."""
    headers = {"X-Loraswap-Seed": str(work.params.seed)}
    if any(a.stale for a in work.params.adapters) or any(e.stale for e in work.params.embeddings):
        headers[STALE_HEADER] = "adapters"
    return headers


class GenerateController(Controller):
    path = "/v1"
    tags = ["generate"]
    guards = [require("generate")]

    @post(
        "/generate",
        status_code=HTTP_200_OK,
        summary="Generate images.",
        description=(
            "JSON in, JSON out (base64 PNGs, the seed, per-stage timings). `init_image` (base64 PNG/JPEG/"
            "WebP) with `strength` makes it image-to-image, `mask_image` as well inpainting (white = "
            "repaint), following diffusers' Img2Img/Inpaint pipelines; the body may also be "
            "`multipart/form-data` with a `request` part (this JSON) and `init_image` / `mask_image` file "
            "parts. Adapters take `unet_scale` / `text_encoder_scale` besides `scale`. "
            "Send `Accept: image/png` "
            "with num_images=1 to get the PNG bytes directly. Image i uses seed+i, as diffusers does with "
            "a list of CPU generators. PNGs carry A1111-style parameters in a 'parameters' text chunk. "
            "`X-Loraswap-Stale: adapters` (and `stale: true` on the adapter's entry) when an adapter "
            "named without a version was served from the server's last resolution because the adapter "
            "store did not answer."
        ),
        responses=ROUTE_ERRORS["generate"],
    )
    async def generate(
        self, data: GenerateRequest, request: Request[Any, Any, Any], runtime: Runtime
    ) -> Response[Any]:
        png_only = wants_png(request)
        if png_only and data.num_images != 1:
            raise ValidationFailed(
                "Accept: image/png returns one image; ask for num_images=1 or accept application/json",
                detail={"field": "num_images"},
            )
        work, result = await run_generation(data, request, runtime)
        if result is None:
            return Response(b"", status_code=CLIENT_CLOSED)
        headers = {**generation_headers(work), "X-Loraswap-Lora-Path": result.lora_path}
        if png_only:
            headers["X-Loraswap-Timings"] = ",".join(f"{k}={v}" for k, v in result.timings.items())
            return Response(result.pngs[0], media_type=PNG, headers=headers)
        body = GenerateResponse.model_validate(result.to_json())
        return Response(body, headers=headers)
