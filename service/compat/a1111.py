"""AUTOMATIC1111's ``/sdapi/v1`` request and response shapes, translated to and from ``GenerateRequest``.

Field names and defaults follow A1111's API models (``modules/api/models.py``, built from
``StableDiffusionProcessing``): ``steps`` 50, ``cfg_scale`` 7.0, ``seed`` −1 (random), ``batch_size`` ×
``n_iter`` images with seeds ``seed + i`` (A1111's ``all_seeds``, diffusers' and loraswap's convention),
sampler ``Euler`` when none is named. Unlike A1111's fixed 512, an absent ``width``/``height`` is the
base model's native size (512 for SD1.5, 1024 for SDXL), as on ``/v1/generate``. Flux follows Forge
(the A1111 fork that serves it): ``distilled_cfg_scale`` (3.5) is the guidance Flux-dev embeds and
``cfg_scale`` real classifier-free guidance — run, as diffusers' ``FluxPipeline`` runs it, only with a
negative prompt, so a client's default ``cfg_scale`` 7 without one draws Flux's usual picture.

Unknown fields are ignored, as A1111's pydantic models ignore them. Fields A1111 has and loraswap does
not implement are ignored when they do not change the picture or only tune a sampler detail
(``eta``, ``s_*``, ``mask_blur``, ``inpainting_fill``, ``inpaint_full_res*``, ``save_images`` …) and
refused (422 ``unsupported_option``) when set to a value that would (``enable_hr``, ``restore_faces``,
``tiling``, ``subseed_strength``, ``styles``, ``script_name``, ``alwayson_scripts``, ``infotext``,
``resize_mode``, ``inpainting_mask_invert``); docs/api.md has the full table.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from basemodel.errors import ValidationFailed
from basemodel.families.base import ModelFamily
from service.compat.errors import Img2ImgUnavailable, ModelNotFound, SamplerNotFound, UnsupportedOption
from service.engine.png import a1111_parameters
from service.engine.progress import WorkerProgress
from service.engine.runtime import GenerationResult
from service.engine.schedulers import available
from service.schemas import MAX_SEED, GenerateRequest
from service.suggest import closest

LENIENT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
"""A1111 ignores fields it does not know; known fields keep loraswap's strict types."""

MAX_PROMPT = 4000
MAX_IMAGES = 8  # batch_size × n_iter, as /v1/generate's num_images


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler name and the loraswap scheduler(s) that implement it."""

    name: str
    scheduler: str  # loraswap's name for A1111's 'Automatic' schedule
    karras: str | None = None  # loraswap's name for the 'Karras' schedule, when there is one
    aliases: tuple[str, ...] = ()


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "dpmpp_2m", "dpmpp_2m_karras", ("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", "dpmpp_sde", "dpmpp_sde_karras", ("k_dpmpp_sde",)),
    Sampler("DPM++ 2M SDE", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", ("k_dpmpp_2m_sde",)),
    Sampler("Euler a", "euler_a", None, ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "euler", None, ("k_euler",)),
    Sampler("Heun", "heun", None, ("k_heun",)),
    Sampler("DDIM", "ddim", None, ("ddim",)),
    Sampler("PLMS", "pndm", None, ("plms",)),
    Sampler("UniPC", "unipc", None, ("unipc",)),
)
DEFAULT_SAMPLER = "Euler"  # A1111's API default (models.py: sampler_index = "Euler")
SCHEDULES = (("automatic", "Automatic"), ("karras", "Karras"))


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's ``SamplerItem`` shape."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in offered_samplers()]


def offered_samplers() -> list[Sampler]:
    """The samplers this server can run (``DPM++ SDE`` needs the ``sde`` extra's torchsde)."""
    return [s for s in SAMPLERS if available(s.scheduler)]


def schedule_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: A1111's ``SchedulerItem`` shape."""
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": None}
        for name, label in SCHEDULES
    ]


def scheduler_for(sampler_name: str | None, schedule: str | None) -> str:
    """A1111 (sampler, schedule type) → loraswap scheduler name. Old combined names such as
    ``"DPM++ 2M Karras"`` are split as A1111 splits them. Unknown sampler → 404 (as A1111)."""
    name = (sampler_name or DEFAULT_SAMPLER).strip()
    wanted = (schedule or "automatic").strip().lower()
    for _, label in SCHEDULES[1:]:
        if name.lower().endswith(" " + label.lower()):
            name, wanted = name[: -len(label) - 1], label.lower()
    found = next(
        (s for s in offered_samplers() if name.lower() in (s.name.lower(), *s.aliases)),
        None,
    )
    if found is None:
        offered = [s.name for s in offered_samplers()]
        meant = closest(name, offered)
        detail: dict[str, Any] = {"field": "sampler_name", "available": offered}
        if meant is not None:
            detail["suggestion"] = meant
        raise SamplerNotFound(
            f"Sampler not found: {name!r}"
            + (f" (did you mean {meant!r}?)" if meant else "")
            + f". This server offers: {', '.join(offered)} — each also with scheduler 'Karras' where "
            f"A1111 has it ({', '.join(s.name for s in offered_samplers() if s.karras)})",
            detail=detail,
        )
    if wanted in ("automatic", ""):
        return found.scheduler
    if wanted == "karras" and found.karras is not None:
        return found.karras
    with_karras = [s.name for s in offered_samplers() if s.karras]
    raise UnsupportedOption(
        f"schedule type {schedule!r} is not available with sampler {found.name!r} (Karras is offered "
        f"with {', '.join(with_karras)})",
        detail={"field": "scheduler", "available": ["Automatic", f"Karras (with {', '.join(with_karras)})"]},
    )


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``: A1111's ``StableDiffusionProcessingTxt2Img`` fields that matter here."""

    model_config = LENIENT

    prompt: str | None = Field("", max_length=MAX_PROMPT, description="May hold <lora:id:weight> tags.")
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT)
    styles: list[str] | None = Field(None, max_length=16, description="Refused unless empty (no styles).")
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="-1: random; image i uses seed+i.")
    subseed: int | None = Field(-1, description="Ignored (variation seeds need subseed_strength).")
    subseed_strength: float | None = Field(0.0, description="Refused unless 0.")
    seed_resize_from_h: int | None = Field(-1, description="Ignored.")
    seed_resize_from_w: int | None = Field(-1, description="Ignored.")
    sampler_name: str | None = Field(None, max_length=64, description="E.g. 'Euler a', 'DPM++ 2M'.")
    sampler_index: str | None = Field(DEFAULT_SAMPLER, max_length=64, description="Old name of it.")
    scheduler: str | None = Field(None, max_length=64, description="'Automatic' or 'Karras'.")
    batch_size: int | None = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int | None = Field(1, ge=1, le=MAX_IMAGES, description="batch_size × n_iter ≤ 8 images.")
    steps: int | None = Field(50, ge=1, le=150)
    cfg_scale: float | None = Field(
        7.0,
        ge=0.0,
        le=30.0,
        description="Classifier-free guidance (≤ 1: off). Flux: real CFG, run only with a negative prompt.",
    )
    distilled_cfg_scale: float | None = Field(
        3.5,
        ge=0.0,
        le=30.0,
        description="Forge's: the guidance Flux-dev embeds (its usual 3.5); ignored by the other families.",
    )
    width: int | None = Field(None, ge=8, multiple_of=8, description="Default: the model's native size.")
    height: int | None = Field(None, ge=8, multiple_of=8, description="Default: the model's native size.")
    restore_faces: bool | None = Field(None, description="Refused when true.")
    tiling: bool | None = Field(None, description="Refused when true.")
    enable_hr: bool | None = Field(False, description="Refused when true (no hires fix).")
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0, description="Hires fix only: ignored.")
    override_settings: dict[str, Any] | None = Field(
        None, description="Only 'sd_model_checkpoint' is read (must name the resident base); others ignored."
    )
    override_settings_restore_afterwards: bool | None = True
    script_name: str | None = Field(None, max_length=200, description="Refused unless empty.")
    script_args: list[Any] | None = Field(None, description="Ignored without script_name.")
    alwayson_scripts: dict[str, Any] | None = Field(None, description="Refused unless empty.")
    send_images: bool | None = Field(True, description="false: 'images' is empty.")
    save_images: bool | None = Field(False, description="Ignored: nothing is saved on the server.")
    infotext: str | None = Field(None, max_length=20_000, description="Refused unless empty.")


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: txt2img's fields plus the init image, the mask and the strength."""

    init_images: list[str] | None = Field(None, max_length=8, description="Base64 (or data: URL); one.")
    mask: str | None = Field(None, description="Base64 inpainting mask; white = repaint.")
    denoising_strength: float | None = Field(0.75, ge=0.0, le=1.0, description="How much to change.")
    resize_mode: int | None = Field(0, description="0 (the image as sent); others refused.")
    mask_blur: int | None = Field(4, description="Ignored: the mask is used as sent.")
    inpainting_fill: int | None = Field(0, description="Ignored: diffusers' inpainting, always.")
    inpaint_full_res: bool | None = Field(True, description="Ignored: the whole picture is inpainted.")
    inpaint_full_res_padding: int | None = Field(0, description="Ignored.")
    inpainting_mask_invert: int | None = Field(0, description="0; 1 (repaint black) refused.")
    initial_noise_multiplier: float | None = Field(None, description="Ignored.")
    image_cfg_scale: float | None = Field(None, description="Ignored (instruct-pix2pix only).")
    include_init_images: bool | None = Field(False, description="Echo init_images/mask in 'parameters'.")


class A1111Response(BaseModel):
    """A1111's ``TextToImageResponse`` / ``ImageToImageResponse``."""

    images: list[str] = Field(description="Base64 PNGs (no data: prefix), with the infotext chunk.")
    parameters: dict[str, Any] = Field(description="The request as understood, with defaults.")
    info: str = Field(description="JSON text: seed, all_seeds, infotexts, prompt, sampler_name, …")


# -- request translation ---------------------------------------------------------------------------

REFUSED_WHEN_SET: tuple[tuple[str, str], ...] = (
    ("enable_hr", "the hires fix"),
    ("restore_faces", "face restoration"),
    ("tiling", "tiling"),
    ("styles", "prompt styles"),
    ("script_name", "scripts"),
    ("alwayson_scripts", "extensions (alwayson_scripts)"),
    ("infotext", "parameters from an infotext"),
)
"""Options whose non-default value would change the picture in a way loraswap cannot reproduce."""

# GenerateRequest field → the A1111 field a client would recognise in an error
A1111_FIELD = {
    "guidance_scale": "cfg_scale",
    "true_cfg_scale": "cfg_scale",
    "num_images": "batch_size",
    "init_image": "init_images",
    "mask_image": "mask",
    "strength": "denoising_strength",
}


def a1111_field(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "body"
    return A1111_FIELD.get(str(loc[0]), str(loc[0]))


def img2img_supported() -> bool:
    return "init_image" in GenerateRequest.model_fields


def base64_payload(value: str, *, field: str) -> str:
    """A1111 takes raw base64 or a ``data:image/…;base64,`` URL; URLs are never fetched here."""
    text = value.strip()
    if text.startswith(("http://", "https://")):
        raise UnsupportedOption(f"{field}: image URLs are not fetched; send base64", detail={"field": field})
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ValidationFailed(f"{field}: a data: URL must be base64", detail={"field": field})
    return text


def check_checkpoint(name: Any, titles: set[str], *, field: str) -> None:
    """An A1111 checkpoint name must be one of the resident base's names (there is only one)."""
    if name in (None, ""):
        return
    if not isinstance(name, str) or name not in titles:
        raise ModelNotFound(
            f"Model not found: {name!r} (this server serves one base model: {sorted(titles)[0]!r})",
            detail={"field": field},
        )


def refuse_unsupported(req: Txt2ImgRequest) -> None:
    for name, what in REFUSED_WHEN_SET:
        if getattr(req, name):
            raise UnsupportedOption(f"{name}: {what} is not supported", detail={"field": name})
    if req.subseed_strength:
        raise UnsupportedOption(
            "subseed_strength: variation seeds are not supported", detail={"field": "subseed_strength"}
        )
    if isinstance(req, Img2ImgRequest):
        if req.resize_mode:
            raise UnsupportedOption(
                "resize_mode: only 0 is supported (the init image is used as sent)",
                detail={"field": "resize_mode"},
            )
        if req.inpainting_mask_invert:
            raise UnsupportedOption(
                "inpainting_mask_invert: send the mask with white = repaint",
                detail={"field": "inpainting_mask_invert"},
            )


def to_generate_request(
    req: Txt2ImgRequest, *, checkpoint_titles: set[str], family: ModelFamily
) -> GenerateRequest:
    """The ``GenerateRequest`` this A1111 request means; refusals and validation errors name A1111's
    fields. ``cfg_scale`` and Forge's ``distilled_cfg_scale`` go where ``family`` takes them
    (``split_guidance``): ``guidance_scale`` on SD1/SD2/SDXL/SD3; ``true_cfg_scale`` and the embedded
    ``guidance_scale`` on Flux."""
    refuse_unsupported(req)
    check_checkpoint(
        (req.override_settings or {}).get("sd_model_checkpoint"),
        checkpoint_titles,
        field="override_settings.sd_model_checkpoint",
    )
    count = (req.batch_size or 1) * (req.n_iter or 1)
    if count > MAX_IMAGES:
        raise ValidationFailed(
            f"batch_size × n_iter = {count} images; at most {MAX_IMAGES} per request",
            detail={"field": "batch_size"},
        )
    fields: dict[str, Any] = {
        "prompt": req.prompt or "",
        "negative_prompt": req.negative_prompt or "",
        "steps": 50 if req.steps is None else req.steps,
        **guidance_fields(req, family),
        "width": req.width,
        "height": req.height,
        "seed": None if req.seed in (None, -1) else req.seed,
        "num_images": count,
        "scheduler": scheduler_for(req.sampler_name or req.sampler_index, req.scheduler),
    }
    if isinstance(req, Img2ImgRequest):
        fields.update(img2img_fields(req))
    try:
        return GenerateRequest.model_validate(fields)
    except PydanticValidationError as exc:
        problems = [{"field": a1111_field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ValidationFailed(message, detail={"errors": problems}) from None


def guidance_fields(req: Txt2ImgRequest, family: ModelFamily) -> dict[str, float]:
    """``guidance_scale`` and ``true_cfg_scale`` from A1111/Forge's ``cfg_scale`` (classifier-free) and
    ``distilled_cfg_scale`` (Flux-dev's guidance embedding), both with Forge's defaults (7.0, 3.5)."""
    cfg = 7.0 if req.cfg_scale is None else req.cfg_scale
    distilled = 3.5 if req.distilled_cfg_scale is None else req.distilled_cfg_scale
    guidance_scale, true_cfg_scale = family.split_guidance(cfg, distilled)
    return {"guidance_scale": guidance_scale, "true_cfg_scale": true_cfg_scale}


def img2img_fields(req: Img2ImgRequest) -> dict[str, Any]:
    """``init_images[0]`` → ``init_image``, ``mask`` → ``mask_image``, ``denoising_strength`` →
    ``strength``; refused with ``img2img_unavailable`` on a build without those fields."""
    if not req.init_images:
        raise ValidationFailed("init_images: one base64 image is required", detail={"field": "init_images"})
    if len(req.init_images) > 1:
        raise UnsupportedOption(
            "init_images: one image per request (send the others as separate requests)",
            detail={"field": "init_images"},
        )
    if not img2img_supported():
        raise Img2ImgUnavailable(
            "img2img and inpainting are not available in this build", detail={"field": "init_images"}
        )
    fields: dict[str, Any] = {
        "init_image": base64_payload(req.init_images[0], field="init_images"),
        "strength": 0.75 if req.denoising_strength is None else req.denoising_strength,
    }
    if req.mask:
        fields["mask_image"] = base64_payload(req.mask, field="mask")
    return fields


# -- response translation --------------------------------------------------------------------------


def parameters_echo(req: Txt2ImgRequest) -> dict[str, Any]:
    """A1111 echoes the request with its defaults; init images and mask only on request."""
    echoed = req.model_dump(mode="json")
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        echoed["init_images"] = None
        echoed["mask"] = None
    return echoed


def infotexts(result: GenerationResult) -> list[str]:
    """One A1111 infotext per image, the PNG's ``parameters`` chunk: the prompt carries a ``<lora:…>`` tag
    per applied adapter, pinned to its version, so pasting it into A1111 (or back here) asks for the same
    adapters (``service.engine.png.infotext_prompt``)."""
    first = result.params.seed
    return [a1111_parameters({**result.parameters, "seed": first + i}) for i in range(len(result.pngs))]


def to_response(req: Txt2ImgRequest, result: GenerationResult) -> A1111Response:
    params = result.params
    seeds = [params.seed + i for i in range(len(result.pngs))]
    prompt = req.prompt or ""
    negative = req.negative_prompt or ""
    sampler = result.parameters["sampler"]
    info: dict[str, Any] = {
        "prompt": prompt,
        "all_prompts": [prompt] * len(seeds),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(seeds),
        "seed": params.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": sampler.removesuffix(" Karras"),
        "scheduler": "Karras" if sampler.endswith(" Karras") else "Automatic",
        "cfg_scale": result.parameters["cfg_scale"],
        "distilled_cfg_scale": result.parameters.get("distilled_cfg_scale"),
        "steps": params.steps,
        "batch_size": req.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.parameters["model"],
        "sd_model_hash": result.parameters["model_hash"][:10],
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if isinstance(req, Img2ImgRequest) else None,
        "extra_generation_params": extra_generation_params(result.parameters),
        "index_of_first_image": 0,
        "infotexts": infotexts(result),
        "styles": [],
        "job_timestamp": "",
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "adapters": result.parameters["adapters"],
        "timings": result.timings,
    }
    images = [base64.b64encode(png).decode() for png in result.pngs] if req.send_images is not False else []
    return A1111Response(images=images, parameters=parameters_echo(req), info=json.dumps(info))


def extra_generation_params(parameters: dict[str, Any]) -> dict[str, str]:
    """A1111's ``Lora hashes`` and ``TI hashes`` (``name: sha256[:12], …``), when there are any."""
    labels = {"lora_hashes": "Lora hashes", "ti_hashes": "TI hashes"}
    return {label: parameters[key] for key, label in labels.items() if parameters.get(key)}


def progress_snapshot(now: WorkerProgress, average_job_s: float) -> dict[str, Any]:
    """``GET /sdapi/v1/progress`` from the worker's snapshot: the running batch's step i/N (``progress`` at
    least 0.01 once it runs, A1111's 'started'), queued and running requests, and the ETA: the running
    batch's remaining time plus one average batch per queued request."""
    jobs = now.queued + now.running
    remaining = (now.eta_s if now.eta_s is not None else average_job_s) if now.running else 0.0
    return {
        "progress": round(max(now.fraction, 0.01), 4) if now.running else 0.0,
        "eta_relative": round(remaining + average_job_s * now.queued, 3) if jobs else 0.0,
        "state": {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "generate" if now.running else "",
            "job_count": jobs,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": now.step,
            "sampling_steps": now.steps,
            "queued": now.queued,
        },
        "current_image": None,
        "textinfo": None,
    }


def checkpoint_item(name: str, fingerprint: str, filename: str) -> dict[str, Any]:
    """``GET /sdapi/v1/sd-models``' entry for the resident base (A1111's ``SDModelItem``)."""
    return {
        "title": f"{name} [{fingerprint[:10]}]",
        "model_name": name.removesuffix(".safetensors"),
        "hash": fingerprint[:10],
        "sha256": fingerprint,
        "filename": filename,
        "config": None,
    }


def checkpoint_names(item: dict[str, Any]) -> set[str]:
    """Every name an A1111 client may use for the checkpoint: title, model name, file name, hashes."""
    title, model_name = item["title"], item["model_name"]
    return {title, model_name, f"{model_name}.safetensors", item["hash"], item["sha256"]}


def lora_item(version: dict[str, Any]) -> dict[str, Any]:
    """``GET /sdapi/v1/loras``' entry (A1111's Lora extension: name, alias, path, metadata); ``name``
    is what goes in ``<lora:name:weight>`` (the latest version), ``path`` the pinned reference."""
    return {
        "name": version["adapter_id"],
        "alias": version.get("title") or version["adapter_id"],
        "path": version["ref"],
        "metadata": version,
    }


def embeddings_listing(versions: list[dict[str, Any]], width: int) -> dict[str, Any]:
    """``GET /sdapi/v1/embeddings`` (A1111's ``EmbeddingsResponse``): every embedding's latest version by
    name — ``vectors``, ``shape`` (``width``: the base's text-encoder width, summed over SDXL's two
    encoders, which registration checked the vectors against), the base checkpoint it was registered
    against; ``skipped`` is empty (embeddings that do not fit the base are refused at registration)."""
    loaded = {
        version["adapter_id"]: {
            "step": None,
            "sd_checkpoint": (version["base_model"].get("fingerprint") or "")[:10] or None,
            "sd_checkpoint_name": version["base_model"].get("name"),
            "shape": width,
            "vectors": version["rank"],
        }
        for version in versions
    }
    return {"loaded": loaded, "skipped": {}}
