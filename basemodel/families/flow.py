"""What the flow-matching transformer families (SD3/SD3.5, Flux.1) share.

They denoise with an MMDiT ``transformer`` that predicts a velocity on a FlowMatch schedule (sigmas
from 1 towards 0, timesteps σ·1000), and their VAE latents are ``(z − shift_factor) · scaling_factor``,
so decoding is ``vae.decode(latents / scaling_factor + shift_factor)``. The shift of the schedule is the
family's: SD3's is static (``shift`` in its scheduler config, 3.0), Flux's follows the image's sequence
length (``calculate_shift``'s ``mu``), as their pipelines compute it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from basemodel.families.base import ModelFamily


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' ``calculate_shift`` (Flux, SD3 with dynamic shifting): ``mu`` linear in the sequence
    length between (``base_seq_len``, ``base_shift``) and (``max_seq_len``, ``max_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def dynamic_mu(config: Any, image_seq_len: int, max_shift: float) -> float:
    """``mu`` from a scheduler config's ``base/max_image_seq_len`` and ``base/max_shift``."""
    return calculate_shift(
        image_seq_len,
        int(config.get("base_image_seq_len", 256)),
        int(config.get("max_image_seq_len", 4096)),
        float(config.get("base_shift", 0.5)),
        float(config.get("max_shift", max_shift)),
    )


def set_flow_timesteps(scheduler: Any, steps: int, device: torch.device, **wanted: Any) -> None:
    """``retrieve_timesteps`` for any scheduler: ``wanted`` (``sigmas``, ``mu``) are passed where its
    ``set_timesteps`` takes them, and left out where it does not (FlowMatchHeun: its static shift)."""
    accepted = set(inspect.signature(scheduler.set_timesteps).parameters)
    kwargs = {key: value for key, value in wanted.items() if key in accepted and value is not None}
    if "sigmas" in kwargs:
        scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


class FlowMatchFamily(ModelFamily):
    """A transformer family trained with flow matching (SD3, Flux): text-to-image and image-to-image
    (their Img2Img pipelines); inpainting not yet."""

    denoiser: ClassVar[str] = "transformer"
    flow_matching: ClassVar[bool] = True
    default_scheduler: ClassVar[str] = "euler"
    image_modes: ClassVar[frozenset[str]] = frozenset({"img2img"})

    @staticmethod
    def prediction_type(scheduler_config: Any) -> str:
        """The velocity of the flow (ε − x₀), whatever the scheduler config says."""
        return "flow_prediction"

    def start_step(self, steps: int, strength: float) -> int:
        """``get_timesteps`` of ``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``: the
        strength is not truncated first (``int(steps − steps × strength)``)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def encode_image(
        self, pipe: Any, pixels: torch.Tensor, generators: Sequence[torch.Generator], *, normalise: bool
    ) -> torch.Tensor:
        """The image's latents ``(z − shift_factor) · scaling_factor``, sampled once with the first
        generator and repeated per output image: what the Img2Img pipelines do with one image and a list
        of generators (``_encode_vae_image`` / ``prepare_latents``)."""
        vae = pipe.vae
        sample = vae.encode(pixels[:1].to(vae.dtype)).latent_dist.sample(generators[0]).to(pixels.dtype)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        latents = (sample - shift) * float(vae.config.scaling_factor)
        return latents.repeat(len(generators), 1, 1, 1)

    def noise_image(
        self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """``scheduler.scale_noise``: (1 − σ)·x + σ·noise at the first step's σ, then ``pack``ed."""
        noised: torch.Tensor = scheduler.scale_noise(latents, timestep, noise)
        return self.pack(noised)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-layout latents → the denoiser's layout (default: the same)."""
        return latents

    def inpainting(self, pipe: Any) -> bool:
        return False

    def size_multiple(self, pipe: Any) -> int:
        """VAE factor × 2: SD3's 2×2 patches (its pipeline refuses other sizes) and Flux's 2×2 packing
        (its pipeline rounds down silently; refusing says so instead)."""
        return int(pipe.vae_scale_factor) * 2

    def begin_denoising(self, scheduler: Any) -> None:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def decode(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """``latents / scaling_factor + shift_factor`` through ``vae.decode`` (after ``unpack``)."""
        vae = pipe.vae
        latents = self.unpack(pipe, latents, height=height, width=width)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        latents = latents / float(vae.config.scaling_factor) + shift
        decoded: torch.Tensor = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return decoded

    def unpack(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None, width: int | None
    ) -> torch.Tensor:
        """Latents in the denoiser's layout → the VAE's ``[rows, channels, h, w]`` (default: as they are)."""
        return latents
