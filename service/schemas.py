"""Request and response models of the HTTP API (pydantic; validated by Litestar → 422).

Request models are strict (``STRICT``): a number is a JSON number and a boolean is ``true``/``false``;
``"1"``, ``true`` or ``1.0`` for an integer are refused, as are strings for numbers and numbers for
booleans. A float field also takes an integer (``7`` for ``7.0``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.metadata import MAX_SCALE, MIN_SCALE
from adapters.refs import ID_PATTERN, MAX_VERSION
from service.openapi import ErrorInfo

SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm", "heun", "unipc"]
MAX_SEED = 2**63 - 1 - 64  # image i uses seed + i; stay inside torch's int64 seed range
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""Every request model: no unknown fields, no type coercion, no NaN/Infinity."""


def adapter_id_field(**kwargs: Any) -> Any:
    return Field(pattern=ID_PATTERN.pattern, **kwargs)


def version_field(description: str) -> Any:
    return Field(None, ge=1, le=MAX_VERSION, description=description)


def scale_field(description: str) -> Any:
    return Field(None, ge=MIN_SCALE, le=MAX_SCALE, description=description)


class AdapterSpec(BaseModel):
    """One adapter to apply: ``id``, optional pinned ``version`` (else latest), optional ``scale``, and
    optional per-component weights (ComfyUI's ``strength_model`` / ``strength_clip``)."""

    model_config = STRICT

    id: str = adapter_id_field(description="Adapter id, e.g. 'watercolor'.", examples=["watercolor"])
    version: int | None = version_field("Pinned version; latest when absent.")
    scale: float | None = scale_field("Weight, -4..4; the adapter's scale_default or 1.0 when absent.")
    denoiser_scale: float | None = scale_field(
        "Weight on the denoiser — the UNet or the transformer (ComfyUI strength_model), -4..4; `scale` "
        "when absent."
    )
    unet_scale: float | None = scale_field("Another name for `denoiser_scale` (its older one).")
    text_encoder_scale: float | None = scale_field(
        "Weight on the text encoder(s) (ComfyUI strength_clip), -4..4; `scale` when absent."
    )


class GenerateRequest(BaseModel):
    model_config = STRICT

    prompt: str = Field(max_length=4000, description="What to draw.", examples=["a red fox"])
    negative_prompt: str = Field("", max_length=4000, description="What to steer away from.")
    steps: int = Field(20, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=30.0,
        description="Guidance: classifier-free (≤1: off) on SD1/SD2/SDXL/SD3; Flux-dev's distilled guidance "
        "(no CFG). Default: the family's (7.5; SD3 7.0; Flux 3.5).",
    )
    true_cfg_scale: float = Field(
        1.0,
        ge=0.0,
        le=30.0,
        description="Flux: real classifier-free guidance with negative_prompt when > 1 (diffusers' "
        "FluxPipeline true_cfg_scale); ignored by the other families.",
    )
    width: int | None = Field(None, ge=8, description="Multiple of 8; default: the model's native size.")
    height: int | None = Field(None, ge=8, description="Multiple of 8; default: the model's native size.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when absent; always echoed.")
    num_images: int = Field(1, ge=1, le=8, description="Images i=0..n-1 use seed+i.")
    scheduler: SchedulerName | None = Field(
        None,
        description="Sampler; default: the family's (ddim; euler on the flow-matching SD3 and Flux). "
        "Flow-matching families take euler, heun, dpmpp_2m, unipc.",
    )
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=8, description="LoRA adapters.")
    init_image: str | None = Field(
        None,
        description="Image-to-image: a base64 PNG, JPEG or WebP (a data: URL prefix is allowed). Width and "
        "height default to its size rounded down to a multiple of 8; otherwise it is resized to them.",
    )
    strength: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="With init_image: how much to change it (diffusers' strength; 1 = start from noise). "
        "int(steps × strength) denoising steps run, at least 1. Ignored without init_image.",
    )
    mask_image: str | None = Field(
        None,
        description="Inpainting, with init_image: a base64 mask of the same size; white = repaint, "
        "black = keep (binarised at 50% grey; a transparent area selects by alpha).",
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value


class ImageOut(BaseModel):
    png_base64: str
    seed: int
    width: int
    height: int


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    seed: int
    parameters: dict[str, Any]
    timings: dict[str, float]
    lora_path: Literal["none", "fused", "hooked"] = Field(
        "none",
        description="How the batch applied adapters: none (no adapter), fused (weights merged for the "
        "batch, no hooks) or hooked (per-row hooks, mixed batches).",
    )
    adapters: list[dict[str, Any]] = Field(default_factory=list)


class JobOut(BaseModel):
    """A job of ``/v1/jobs``: its state, progress and, once it ended, its result or error."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: int | None = Field(None, description="While queued: 1 = the next to start.")
    step: int = Field(description="Denoising steps done.")
    steps: int = Field(description="Denoising steps in all (the sampler's count once running).")
    created_at: float = Field(description="Unix time the job was accepted.")
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="Unix time after which the ended job is gone (404).")
    result: GenerateResponse | None = Field(
        None, description="When succeeded: the body /v1/generate returns."
    )
    error: ErrorInfo | None = Field(
        None, description="When failed: the error, as /v1/generate would answer it."
    )
