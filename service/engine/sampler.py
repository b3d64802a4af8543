"""The text-to-image sampling loop.

It follows diffusers' ``StableDiffusionPipeline.__call__`` step for step (same prompt encoding,
latent initialisation, classifier-free guidance and VAE decode), so any result reproduces in plain
diffusers with ``generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]``. It is
written out here because the server needs per-stage timings, per-step cancellation, a per-request
scheduler and, later, per-sample adapters.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from basemodel.loader import Pipeline
from service.engine.schedulers import make_scheduler


class Cancelled(Exception):
    """The job was abandoned (client gone or deadline passed) between two denoising steps."""


@dataclass(frozen=True)
class SampleParams:
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    scheduler: str


@dataclass
class StageTimer:
    """Accumulates wall-clock seconds per stage."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def generators_for(seed: int, n: int) -> list[torch.Generator]:
    """diffusers' convention: image i draws its initial noise from a CPU generator seeded seed + i."""
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


@torch.no_grad()
def sample(
    pipe: Pipeline,
    params: SampleParams,
    timer: StageTimer,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[Image.Image]:
    device, dtype = pipe.unet.device, pipe.unet.dtype
    n = params.num_images
    do_cfg = params.guidance_scale > 1.0

    started = time.perf_counter()
    cond, uncond = pipe.encode_prompt(
        params.prompt,
        device,
        num_images_per_prompt=n,
        do_classifier_free_guidance=do_cfg,
        negative_prompt=params.negative_prompt or None,
    )
    embeds = torch.cat([uncond, cond]) if do_cfg else cond
    timer.add("text_encode", started)

    started = time.perf_counter()
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)
    scheduler.set_timesteps(params.steps, device=device)
    generators = generators_for(params.seed, n)
    scale = pipe.vae_scale_factor
    shape = (n, pipe.unet.config.in_channels, params.height // scale, params.width // scale)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators)
    for t in scheduler.timesteps:
        if should_stop():
            raise Cancelled
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise = pipe.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if do_cfg:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + params.guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    timer.add("denoise", started)

    started = time.perf_counter()
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images: list[Image.Image] = pipe.image_processor.postprocess(
        decoded, output_type="pil", do_denormalize=[True] * n
    )
    timer.add("decode", started)
    return images
