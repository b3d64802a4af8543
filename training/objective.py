"""The diffusion training objectives and the learning-rate schedule.

``NoiseObjective`` (SD1.x, SD2.x, SDXL): MSE between the UNet output and the target (the noise for
epsilon-prediction bases, the velocity for v-prediction ones), optionally min-SNR weighted (Hang et al.
2023, ``--snr-gamma``) and with offset noise (``--noise-offset``), as the diffusers example script
computes it. ``FlowObjective`` (SD3, Flux, flow-matching families): the rectified-flow objective of
diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py`` (``training.flow``).
All randomness comes from one CPU ``torch.Generator`` so runs, and resumed runs, are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from training.config import TrainConfig


def training_scheduler(base_scheduler_config: dict[str, Any], prediction_type: str) -> Any:
    """The base model's noise schedule as a DDPM scheduler (for ``add_noise``/``get_velocity``)."""
    scheduler = DDPMScheduler.from_config(base_scheduler_config)
    if prediction_type != "auto":
        scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    alpha_bar = alphas_cumprod[timesteps.cpu()].to(timesteps.device)
    return alpha_bar / (1.0 - alpha_bar)


def target_for(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction type {kind!r}")


def draw_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float, num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (with optional offset) and uniform timesteps, drawn on CPU from ``generator``."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
    return noise, timesteps


@dataclass(frozen=True)
class Noised:
    """One batch made ready for the loss: the noisy latents, the target, the timesteps the denoiser is
    called with and per-sample loss weights (None: the plain mean)."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor | None = None


def weighted_mse(prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE, times ``noised.weights`` when there are any."""
    dims = tuple(range(1, prediction.dim()))
    per_sample = F.mse_loss(prediction.float(), noised.target.float(), reduction="none").mean(dim=dims)
    if noised.weights is None:
        return per_sample.mean()
    return (per_sample * noised.weights.to(per_sample.device)).mean()


class Objective:
    """What every training objective shares: its schedule's length, validation at fixed schedule points
    (``at``, ``validation_points``) and the (weighted) MSE; subclasses say how latents are noised."""

    scheduler: Any

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def at(self, latents: torch.Tensor, noise: torch.Tensor, points: list[int]) -> Noised:
        """``latents`` noised with ``noise`` at the fixed schedule points ``points`` (validation)."""
        return self._noised(latents, noise, torch.tensor(points, dtype=torch.long), weighted=False)

    def validation_points(self, count: int) -> list[int]:
        return fixed_timesteps(self.num_train_timesteps, count)

    def loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        return weighted_mse(prediction, noised)

    def _noised(
        self, latents: torch.Tensor, noise: torch.Tensor, points: torch.Tensor, *, weighted: bool
    ) -> Noised:
        raise NotImplementedError


class NoiseObjective(Objective):
    """Noise (or v) prediction on the base's DDPM schedule."""

    def __init__(self, scheduler: Any, config: TrainConfig) -> None:
        self.scheduler = scheduler
        self.noise_offset = config.noise_offset
        self.snr_gamma = config.snr_gamma

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        noise, timesteps = draw_noise(latents, generator, self.noise_offset, self.num_train_timesteps)
        return self._noised(latents, noise, timesteps, weighted=True)

    def _noised(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *, weighted: bool
    ) -> Noised:
        weights = None
        if weighted and self.snr_gamma is not None:
            ratio = snr(self.scheduler, timesteps)
            clipped = torch.minimum(ratio, torch.full_like(ratio, self.snr_gamma))
            if self.prediction_type == "v_prediction":
                weights = clipped / (ratio + 1)
            else:
                weights = clipped / ratio.clamp(min=1e-8)
        return Noised(
            self.scheduler.add_noise(latents, noise, timesteps),
            target_for(self.scheduler, latents, noise, timesteps),
            timesteps,
            weights,
        )


def fixed_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps evenly spread over the middle 90 % of the schedule."""
    if count == 1:
        return [num_train_timesteps // 2]
    lo, hi = 0.05 * num_train_timesteps, 0.95 * (num_train_timesteps - 1)
    return [round(lo + (hi - lo) * i / (count - 1)) for i in range(count)]


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then constant/cosine/linear."""
    warmup = config.lr_warmup_steps
    kind = config.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
