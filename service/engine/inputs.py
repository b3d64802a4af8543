"""A request's image inputs: which mode it asks for, whether the base model can do it, the output size.

Rules (docs/api.md, "Image-to-image and inpainting"):

- ``mask_image`` needs ``init_image``; the mask must have the init image's size (after its EXIF
  orientation), else 422 ``mask_size_mismatch``.
- ``strength`` must leave at least one denoising step: ``int(steps × strength) ≥ 1`` (diffusers raises
  otherwise); without ``init_image`` it is ignored.
- An inpainting checkpoint (9-channel UNet) only inpaints: a request without a mask is 422.
- Width and height default to the init image's size rounded down to a multiple of 8 (diffusers'
  ``VaeImageProcessor`` rounds down to the VAE factor); otherwise the image (and mask) are resized to
  them with Lanczos, as ``VaeImageProcessor.preprocess`` does. A default size above ``max_width`` /
  ``max_height`` is 422 ``image_too_large`` (send a width and height to have the image resized).
"""

from __future__ import annotations

from dataclasses import dataclass

from basemodel.errors import ImageInvalid, ImageTooLarge, MaskMismatch, Unsupported, ValidationFailed
from basemodel.loader import BaseModel
from basemodel.settings import Settings
from service.engine.image_modes import ImageInput
from service.images import ProbedImage, load, probe
from service.schemas import GenerateRequest

MULTIPLE = 8


@dataclass(frozen=True)
class ProbedInputs:
    init: ProbedImage
    mask: ProbedImage | None


def check_mode(base: BaseModel, request: GenerateRequest) -> None:
    """What the request asks for fits the base model and itself (before any image is read)."""
    if request.mask_image is not None and request.init_image is None:
        raise ValidationFailed("mask_image needs an init_image to inpaint", detail={"field": "mask_image"})
    family = base.family
    mode = "txt2img" if request.init_image is None else "inpaint" if request.mask_image else "img2img"
    if mode != "txt2img" and mode not in family.image_modes:
        field = "mask_image" if mode == "inpaint" else "init_image"
        raise Unsupported(
            f"{mode} is not supported on {family.label} ({family.name}) base models yet; they do "
            f"text-to-image and {', '.join(sorted(family.image_modes)) or 'nothing else'}",
            detail={"field": field, "mode": mode, "family": family.name},
            hint="Send the request without mask_image, or serve an SD1.x, SD2.x or SDXL model to inpaint.",
        )
    if base.family.inpainting(base.pipe) and request.mask_image is None:
        raise ValidationFailed(
            f"the base model {base.name} is an inpainting checkpoint (9-channel UNet): it only inpaints",
            detail={"field": "mask_image"},
            hint="Send init_image and mask_image, or serve a text-to-image checkpoint.",
        )
    start = family.start_step(request.steps, request.strength)
    if request.init_image is not None and request.steps - start < 1:
        raise ValidationFailed(
            f"strength {request.strength:g} with {request.steps} steps gives no denoising step "
            "(int(steps × strength) must be at least 1)",
            detail={"field": "strength"},
            hint="Raise strength or steps.",
        )


def check_size(base: BaseModel, width: int, height: int) -> None:
    """The size fits the family's latent grid (SD3/Flux: multiples of 16 on the released models)."""
    multiple = base.family.size_multiple(base.pipe)
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValidationFailed(
                f"{name} {value} is not a multiple of {multiple}, which {base.family.label} models need "
                "(the VAE's factor times the transformer's 2×2 patches)",
                detail={"field": name, "multiple": multiple},
                hint=f"Use {lower} or {lower + multiple}.",
            )


def probe_inputs(request: GenerateRequest, settings: Settings) -> ProbedInputs:
    """Both images checked up to their headers (no pixel decoded); the mask's size against the image's."""
    assert request.init_image is not None
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
    init = probe(request.init_image, "init_image", **limits)
    mask = None if request.mask_image is None else probe(request.mask_image, "mask_image", **limits)
    if mask is not None and (mask.width, mask.height) != (init.width, init.height):
        raise MaskMismatch(
            f"mask_image is {mask.width}×{mask.height} but init_image is {init.width}×{init.height}",
            detail={
                "field": "mask_image",
                "mask": [mask.width, mask.height],
                "image": [init.width, init.height],
            },
        )
    return ProbedInputs(init, mask)


def output_size(
    request: GenerateRequest, native: int, probed: ProbedInputs | None, settings: Settings
) -> tuple[int, int]:
    """(width, height): as asked, else the init image's size rounded down to a multiple of 8, else the
    model's native size."""
    if probed is None:
        return request.width or native, request.height or native
    init = probed.init
    width = request.width or init.width // MULTIPLE * MULTIPLE
    height = request.height or init.height // MULTIPLE * MULTIPLE
    if width < MULTIPLE or height < MULTIPLE:
        raise ImageInvalid(
            f"init_image is {init.width}×{init.height}; it must be at least {MULTIPLE}×{MULTIPLE} pixels",
            detail={"field": "init_image", "reason": "size"},
        )
    too_wide = request.width is None and width > settings.max_width
    too_high = request.height is None and height > settings.max_height
    if too_wide or too_high:
        raise ImageTooLarge(
            f"init_image is {init.width}×{init.height}, above the server's limit of "
            f"{settings.max_width}×{settings.max_height}",
            detail={
                "field": "init_image",
                "reason": "size",
                "limit": [settings.max_width, settings.max_height],
            },
            hint="Send width and height within the limits to have the image resized, or a smaller image.",
        )
    return width, height


def load_inputs(
    probed: ProbedInputs, strength: float, settings: Settings, start: int | None = None
) -> ImageInput:
    """Decode both images (first frame, EXIF orientation, RGB / grey mask); ``start``: the first step
    the family's Img2Img pipeline runs for this strength (``ModelFamily.start_step``)."""
    pixels = settings.max_image_pixels
    image = load(probed.init, max_pixels=pixels)
    mask = None if probed.mask is None else load(probed.mask, mask=True, max_pixels=pixels)
    return ImageInput(image, mask, strength, start)
