"""Where denoising starts, and what the loop adds per step: text-to-image, image-to-image, inpainting.

Each mode follows its diffusers pipeline step for step (the SDXL variants are the same steps; what
differs per family — the noise's layout, the VAE encode and its latent normalisation — is
``ModelFamily.noise_latents`` / ``ModelFamily.encode_image``):

- text-to-image: the family's noise (``prepare_latents``; Flux packs it) × ``init_noise_sigma``, every
  timestep.
- image-to-image (``StableDiffusionImg2ImgPipeline``; SD3's and Flux's Img2Img pipelines through the
  family's ``start_step``, ``encode_image`` and ``noise_image``: ``scale_noise``, Flux packs after it):
  ``VaeImageProcessor.preprocess`` of the init
  image to (height, width); ``get_timesteps``: ``int(steps × strength)`` steps from index
  ``t_start = steps − that`` (``set_begin_index(t_start × order)``); the image repeated per output
  image and encoded by the VAE with generator *i* for copy *i*; noise drawn with the same generators;
  ``scheduler.add_noise`` at the first remaining timestep.
- inpainting (``StableDiffusionInpaintPipeline``): the mask preprocessed by a grey, binarising
  ``VaeImageProcessor`` (≥ 0.5 → repaint); the masked image = image × (mask < 0.5); the image's latents
  (when the UNet has 4 channels or strength < 1) and the masked image's latents encoded once with
  generator 0 of the request (as diffusers does with a list of generators and one image); strength 1
  starts from pure noise. A dedicated inpainting UNet (``ModelFamily.inpainting``: 9 input channels)
  gets [latents, mask, masked-image latents] stacked; a 4-channel UNet gets diffusers' legacy blend
  after every step: ``(1 − mask) · add_noise(image latents, noise, next t) + mask · latents``.

A batch shares the mode and ``t_start`` (``SampleParams.batch_key``); rows are per request in order,
and under guidance the UNet's extra inputs are duplicated as its latents are (uncond rows, then cond).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from basemodel.families import ModelFamily

if TYPE_CHECKING:
    from service.engine.sampler import SampleParams

MODES = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class ImageInput:
    """A request's init image (RGB, already at its decoded size), optional mask (``L``) and strength."""

    image: Image.Image
    mask: Image.Image | None
    strength: float
    start: int | None = None  # the first step run (``ModelFamily.start_step``); None: SD's rule

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"


def start_index(steps: int, strength: float) -> int:
    """diffusers' ``get_timesteps``: the index of the first of the ``int(steps × strength)`` steps run."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def denoising_steps(steps: int, strength: float) -> int:
    return steps - start_index(steps, strength)


def timesteps_from(scheduler: Any, start: int | None) -> torch.Tensor:
    """All timesteps (text-to-image, ``start`` None), or those from ``start`` with the scheduler's
    begin index set there (``get_timesteps`` of the image pipelines)."""
    if start is None:
        timesteps: torch.Tensor = scheduler.timesteps
        return timesteps
    first = start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)
    sliced: torch.Tensor = scheduler.timesteps[first:]
    return sliced


def mask_processor(pipe: Any) -> VaeImageProcessor:
    """The inpainting pipelines' ``mask_processor``."""
    return VaeImageProcessor(
        vae_scale_factor=pipe.vae_scale_factor,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )


class Start:
    """Initial latents for a batch, plus the per-step hooks of its mode (text-to-image: none)."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents

    def model_input(self, model_input: torch.Tensor) -> torch.Tensor:
        """What the denoiser takes this step (inpainting UNets: the mask and masked image stacked on)."""
        return model_input

    def after_step(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        return latents


class InpaintStart(Start):
    def __init__(
        self,
        latents: torch.Tensor,
        *,
        scheduler: Any,
        timesteps: torch.Tensor,
        nine_channels: bool,
        mask: torch.Tensor,
        masked: torch.Tensor,
        image_latents: torch.Tensor | None,
        noise: torch.Tensor,
        guidance: bool,
    ) -> None:
        super().__init__(latents)
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.nine = nine_channels
        self.mask, self.image_latents, self.noise = mask, image_latents, noise
        copies = 2 if guidance else 1
        self.mask_input = torch.cat([mask] * copies)
        self.masked_input = torch.cat([masked] * copies)

    def model_input(self, model_input: torch.Tensor) -> torch.Tensor:
        if not self.nine:
            return model_input
        return torch.cat([model_input, self.mask_input, self.masked_input], dim=1)

    def after_step(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        if self.nine:
            return latents
        assert self.image_latents is not None
        proper = self.image_latents
        if index < len(self.timesteps) - 1:
            next_t = self.timesteps[index + 1]
            proper = self.scheduler.add_noise(proper, self.noise, torch.tensor([next_t]))
        return (1 - self.mask) * proper + self.mask * latents


def prepare_start(
    pipe: Any,
    family: ModelFamily,
    batch: Sequence[SampleParams],
    scheduler: Any,
    timesteps: torch.Tensor,
    generators: Sequence[Sequence[torch.Generator]],
    guidance: bool,
) -> Start:
    """The batch's initial latents (rows per request, in order) and its mode's hooks."""
    first = batch[0]
    denoiser = family.denoiser_module(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    if first.image is None:
        count = sum(p.num_images for p in batch)
        flat = [g for gens in generators for g in gens]
        initial = family.noise_latents(pipe, count, first.height, first.width, flat, device, dtype)
        return Start(initial * getattr(scheduler, "init_noise_sigma", 1.0))  # FlowMatch: pure noise, σ = 1
    if first.image.mask is None:
        rows = [
            _img2img(pipe, family, p, scheduler, timesteps, gens)
            for p, gens in zip(batch, generators, strict=True)
        ]
        return Start(torch.cat(rows))
    nine = family.inpainting(pipe)
    parts = [
        _inpaint(pipe, family, p, scheduler, timesteps, gens, nine)
        for p, gens in zip(batch, generators, strict=True)
    ]
    latents, noise, mask, masked, image_latents = (
        torch.cat(column) if column[0] is not None else None for column in zip(*parts, strict=True)
    )
    assert latents is not None and noise is not None and mask is not None and masked is not None
    return InpaintStart(
        latents,
        scheduler=scheduler,
        timesteps=timesteps,
        nine_channels=nine,
        mask=mask,
        masked=masked,
        image_latents=image_latents,
        noise=noise,
        guidance=guidance,
    )


def _img2img(
    pipe: Any,
    family: ModelFamily,
    params: SampleParams,
    scheduler: Any,
    timesteps: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """``StableDiffusion(XL)Img2ImgPipeline``: preprocess, encode each copy with its generator, add noise."""
    assert params.image is not None
    denoiser = family.denoiser_module(pipe)
    device, dtype, n = denoiser.device, denoiser.dtype, params.num_images
    pixels = pipe.image_processor.preprocess(params.image.image, height=params.height, width=params.width)
    pixels = pixels.to(device=device, dtype=dtype)
    init = family.encode_image(pipe, torch.cat([pixels] * n), generators, normalise=True)
    noise = randn_tensor(init.shape, generator=list(generators), device=device, dtype=dtype)
    return family.noise_image(scheduler, init, noise, timesteps[:1].repeat(n))


def _inpaint(
    pipe: Any,
    family: ModelFamily,
    params: SampleParams,
    scheduler: Any,
    timesteps: torch.Tensor,
    generators: Sequence[torch.Generator],
    nine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``StableDiffusion(XL)InpaintPipeline``: (latents, noise, mask, masked-image latents, image latents)."""
    assert params.image is not None and params.image.mask is not None
    denoiser = family.denoiser_module(pipe)
    device, dtype, n = denoiser.device, denoiser.dtype, params.num_images
    height, width, factor = params.height, params.width, pipe.vae_scale_factor
    init = pipe.image_processor.preprocess(params.image.image, height=height, width=width).to(torch.float32)
    condition = mask_processor(pipe).preprocess(params.image.mask, height=height, width=width)
    masked_pixels = init * (condition < 0.5)
    full_strength = params.image.strength == 1.0
    image_latents = None
    if not nine or not full_strength:
        encoded = family.encode_image(
            pipe, init.to(device=device, dtype=dtype), generators[:1], normalise=False
        )
        image_latents = encoded.repeat(n, 1, 1, 1)
    shape = (n, int(pipe.vae.config.latent_channels), height // factor, width // factor)
    noise = randn_tensor(shape, generator=list(generators), device=device, dtype=dtype)
    if full_strength:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
    mask = torch.nn.functional.interpolate(condition, size=(height // factor, width // factor))
    mask = mask.to(device=device, dtype=dtype).repeat(n, 1, 1, 1)
    masked_pixels = masked_pixels.to(device=device, dtype=dtype)
    masked = family.encode_image(pipe, masked_pixels, generators[:1], normalise=False).repeat(n, 1, 1, 1)
    return latents, noise, mask, masked.to(device=device, dtype=dtype), image_latents
