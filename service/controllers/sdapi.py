"""AUTOMATIC1111-compatible routes (``/sdapi/v1/*``) for A1111 clients such as ``webuiapi``.

Generation routes translate the body (``service/compat/a1111.py``) into a ``GenerateRequest`` and run
it through ``run_generation``, the code path of ``POST /v1/generate``: same limits, admission (429),
adapters (``<lora:…>`` tags), batching, metrics and deadline. Every route needs the ``generate``
scope; besides ``Authorization: Bearer <token>`` they take HTTP basic auth with the token as the
password (``webuiapi``'s ``set_auth(any_user, token)``). Errors keep loraswap's body and A1111's status
codes where they have one: 422 for invalid input, 404 for an unknown sampler or checkpoint.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK

from adapters.embedding import text_widths
from service.auth import require
from service.compat import a1111
from service.compat.a1111 import A1111Response, Img2ImgRequest, Txt2ImgRequest
from service.controllers.adapters import adapter_manager
from service.controllers.generate import CLIENT_CLOSED, generation_headers, run_generation
from service.engine.runtime import Runtime
from service.openapi import ROUTE_ERRORS


def checkpoint(runtime: Runtime) -> dict[str, Any]:
    base = runtime.check_ready()
    return a1111.checkpoint_item(base.name, base.fingerprint, runtime.settings.base_model)


class SdapiController(Controller):
    path = "/sdapi/v1"
    tags = ["a1111"]
    guards = [require("generate", basic=True)]

    async def _generate(
        self, data: Txt2ImgRequest, request: Request[Any, Any, Any], runtime: Runtime
    ) -> Response[Any]:
        names = a1111.checkpoint_names(checkpoint(runtime))
        family = runtime.check_ready().family
        wanted = a1111.to_generate_request(data, checkpoint_titles=names, family=family)
        work, result = await run_generation(wanted, request, runtime)
        if result is None:
            return Response(b"", status_code=CLIENT_CLOSED)
        return Response(a1111.to_response(data, result), headers=generation_headers(work))

    @post(
        "/txt2img",
        status_code=HTTP_200_OK,
        summary="A1111 txt2img.",
        description=(
            "AUTOMATIC1111's txt2img body and response (`images` base64 PNGs, `parameters`, `info` JSON "
            "text with `seed`, `all_seeds`, `infotexts`). `<lora:id:weight>` tags in the prompt apply "
            "adapters. Unknown fields are ignored; options that would change the picture and are not "
            "implemented are 422 `unsupported_option`; an unknown `sampler_name` is 404."
        ),
        responses=ROUTE_ERRORS["sdapi_generate"],
    )
    async def txt2img(
        self, data: Txt2ImgRequest, request: Request[Any, Any, Any], runtime: Runtime
    ) -> Response[A1111Response]:
        return await self._generate(data, request, runtime)

    @post(
        "/img2img",
        status_code=HTTP_200_OK,
        summary="A1111 img2img and inpainting.",
        description=(
            "txt2img's fields plus `init_images` (one base64 image or data: URL), `mask` (white = "
            "repaint) and `denoising_strength` (→ `/v1/generate`'s `init_image`, `mask_image`, "
            "`strength`). 422 `img2img_unavailable` on a build without image-to-image."
        ),
        responses=ROUTE_ERRORS["sdapi_generate"],
    )
    async def img2img(
        self, data: Img2ImgRequest, request: Request[Any, Any, Any], runtime: Runtime
    ) -> Response[A1111Response]:
        return await self._generate(data, request, runtime)

    @get(
        "/loras",
        summary="A1111 LoRA list: every adapter's latest live version.",
        description="`name` goes into `<lora:name:weight>`; `path` is the pinned `id@version`.",
        responses=ROUTE_ERRORS["sdapi_store"],
    )
    async def loras(self, runtime: Runtime) -> list[dict[str, Any]]:
        manager = adapter_manager(runtime)
        summaries = await manager.read(manager.registry.list, what="listing adapters")
        return [
            a1111.lora_item(s.latest.to_dict())
            for s in summaries
            if s.latest is not None and s.latest.kind != "embedding"
        ]

    @get(
        "/embeddings",
        summary="A1111 embedding list: every textual-inversion embedding's latest live version.",
        description=(
            "`loaded` maps each embedding's id (what a prompt writes, or `embedding:id`) to its `vectors`, "
            "`shape` (vector width; SDXL, SD3: both CLIPs' summed; Flux: CLIP-L's) and the checkpoint it "
            "was registered against; `skipped` is always empty."
        ),
        responses=ROUTE_ERRORS["sdapi_store"],
    )
    async def embeddings(self, runtime: Runtime) -> dict[str, Any]:
        manager = adapter_manager(runtime)
        summaries = await manager.read(manager.registry.list, what="listing adapters")
        versions = [
            s.latest.to_dict() for s in summaries if s.latest is not None and s.latest.kind == "embedding"
        ]
        width = sum(text_widths(manager.identity.architecture).values())
        return a1111.embeddings_listing(versions, width)

    @get(
        "/sd-models",
        summary="A1111 checkpoint list: the resident base model.",
        responses=ROUTE_ERRORS["sdapi_model"],
    )
    async def sd_models(self, runtime: Runtime) -> list[dict[str, Any]]:
        return [checkpoint(runtime)]

    @get(
        "/samplers",
        summary="A1111 sampler list: the samplers this server offers.",
        responses=ROUTE_ERRORS["sdapi_static"],
    )
    async def samplers(self) -> list[dict[str, Any]]:
        return a1111.sampler_list()

    @get(
        "/schedulers",
        summary="A1111 schedule types: Automatic, Karras.",
        responses=ROUTE_ERRORS["sdapi_static"],
    )
    async def schedulers(self) -> list[dict[str, Any]]:
        return a1111.schedule_list()

    @get("/scripts", summary="A1111 script list: none.", responses=ROUTE_ERRORS["sdapi_static"])
    async def scripts(self) -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @get(
        "/progress",
        summary="A1111 progress: the running request's step, queued and running requests.",
        description=(
            "`state.job_count` counts queued + running requests; `progress` is the running batch's "
            "denoising progress (step i of N in `state.sampling_step`/`sampling_steps`; 0 when idle, at "
            "least 0.01 once it runs); `eta_relative` is the running batch's remaining seconds plus one "
            "average batch per queued request; `current_image` is always null."
        ),
        responses=ROUTE_ERRORS["sdapi_progress"],
    )
    async def progress(
        self,
        runtime: Runtime,
        skip_current_image: bool = Parameter(default=False, description="Accepted; no image is sent."),
    ) -> dict[str, Any]:
        worker = runtime.worker
        return a1111.progress_snapshot(worker.snapshot(), worker.average_job_s)

    @get("/options", summary="A1111 options: the checkpoint in use.", responses=ROUTE_ERRORS["sdapi_model"])
    async def get_options(self, runtime: Runtime) -> dict[str, Any]:
        item = checkpoint(runtime)
        return {
            "sd_model_checkpoint": item["title"],
            "sd_checkpoint_hash": item["sha256"],
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
        }

    @post(
        "/options",
        status_code=HTTP_200_OK,
        summary="A1111 set options: only the resident checkpoint can be selected.",
        description=(
            "`sd_model_checkpoint` must name the resident base (title, model name, hash or sha256; 404 "
            "`model_not_found` otherwise); other options are accepted and ignored (nothing is stored)."
        ),
        responses=ROUTE_ERRORS["sdapi_options"],
    )
    async def set_options(self, data: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
        names = a1111.checkpoint_names(checkpoint(runtime))
        a1111.check_checkpoint(data.get("sd_model_checkpoint"), names, field="sd_model_checkpoint")
        return {}
