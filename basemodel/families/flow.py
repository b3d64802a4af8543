"""What the flow-matching transformer families (SD3/SD3.5, Flux.1) share.

They denoise with an MMDiT ``transformer`` that predicts a velocity on a FlowMatch schedule (sigmas
from 1 towards 0, timesteps σ·1000), and their VAE latents are ``(z − shift_factor) · scaling_factor``,
so decoding is ``vae.decode(latents / scaling_factor + shift_factor)``. The shift of the schedule is the
family's: SD3's is static (``shift`` in its scheduler config, 3.0), Flux's follows the image's sequence
length (``calculate_shift``'s ``mu``), as their pipelines compute it.
"""

from __future__ import annotations

import inspect
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
    """A transformer family trained with flow matching (SD3, Flux); text-to-image only for now."""

    denoiser: ClassVar[str] = "transformer"
    flow_matching: ClassVar[bool] = True
    default_scheduler: ClassVar[str] = "euler"
    image_modes: ClassVar[frozenset[str]] = frozenset()

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
