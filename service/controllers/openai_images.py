"""OpenAI-compatible ``POST /v1/images/generations`` for the ``openai`` SDK (``base_url=<server>/v1``).

The body is translated (``service/compat/openai_images.py``) into a ``GenerateRequest`` and run through
``run_generation``, the code path of ``POST /v1/generate``; the SDK's ``api_key`` is the bearer token
(scope ``generate``). Errors on this route have OpenAI's shape and invalid input is 400.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.status_codes import HTTP_200_OK

from basemodel.errors import Incompatible, NotFound
from service.auth import require
from service.compat import openai_images
from service.compat.openai_images import ImageGenerationRequest, ImagesResponse
from service.controllers.generate import CLIENT_CLOSED, generation_headers, run_generation
from service.engine.runtime import Runtime
from service.lora.request import PROMPT_TAG
from service.openapi import ROUTE_ERRORS


class OpenAIImagesController(Controller):
    path = "/v1/images"
    tags = ["openai"]
    guards = [require("generate")]
    exception_handlers = openai_images.EXCEPTION_HANDLERS

    @post(
        "/generations",
        status_code=HTTP_200_OK,
        summary="OpenAI images.generate: `model` = an adapter reference or the base model.",
        description=(
            "OpenAI's CreateImageRequest (`prompt`, `model`, `n`, `size` 'WxH' or 'auto', "
            "`response_format` b64_json; `url` only with LORASWAP_OPENAI_DATA_URLS) and ImagesResponse "
            "(`created`, `data[].b64_json`, `data[].revised_prompt`). `quality`, `style`, `user` … are "
            "ignored. Errors: `{error: {message, type, param, code}}`; invalid input 400, unknown model "
            "404."
        ),
        responses=ROUTE_ERRORS["openai_images"],
    )
    async def generations(
        self, data: ImageGenerationRequest, request: Request[Any, Any, Any], runtime: Runtime
    ) -> Response[ImagesResponse]:
        base = runtime.check_ready()
        wanted = openai_images.to_generate_request(
            data, base_name=base.name, data_urls=runtime.settings.openai_data_urls
        )
        try:
            work, result = await run_generation(wanted, request, runtime)
        except (NotFound, Incompatible) as exc:
            if wanted.adapters and "field" not in exc.detail and not PROMPT_TAG.search(data.prompt):
                exc.detail["field"] = "model"  # the only adapter named is the model: say so in 'param'
            raise
        if result is None:
            return Response(b"", status_code=CLIENT_CLOSED)  # type: ignore[arg-type]
        return Response(openai_images.to_response(data, result), headers=generation_headers(work))
