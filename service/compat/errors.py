"""Typed errors of the compatibility routes (statuses come from ``service/errors.py`` as usual)."""

from __future__ import annotations

from basemodel.errors import NotFound, ValidationFailed


class SamplerNotFound(NotFound):
    """An A1111 sampler name this server does not have (A1111 answers 404 'Sampler not found' too)."""

    type = "sampler_not_found"
    hint = "GET /sdapi/v1/samplers lists the samplers this server offers."


class ModelNotFound(NotFound):
    """A checkpoint (A1111) or model (OpenAI) name that is neither the resident base nor an adapter."""

    type = "model_not_found"
    hint = "GET /sdapi/v1/sd-models names the base model; GET /v1/adapters lists the adapters."


class UnsupportedOption(ValidationFailed):
    """An A1111/OpenAI option this server does not implement, set to a value that would change the
    result (refused rather than silently ignored)."""

    type = "unsupported_option"
    hint = "Leave the option at its default; docs/api.md lists what each compatible route supports."


class Img2ImgUnavailable(ValidationFailed):
    """img2img/inpainting asked of a build whose ``GenerateRequest`` has no ``init_image``."""

    type = "img2img_unavailable"
    hint = "This build generates from text only; use /sdapi/v1/txt2img."
