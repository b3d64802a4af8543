"""The flow-matching objective (SD3, Flux): as diffusers' ``train_dreambooth_lora_sd3.py`` and
``train_dreambooth_lora_flux.py`` compute it.

* the schedule is the base's ``FlowMatchEulerDiscreteScheduler`` as configured (SD3's static shift 3.0
  applies to its sigmas; Flux's dynamic shift does not at training time, as in the scripts);
* ``u`` is drawn by ``compute_density_for_timestep_sampling``'s rule for ``--weighting-scheme``:
  ``logit_normal`` (``sigmoid(N(--logit-mean, --logit-std))``), ``mode`` (``1 − u − s·(cos²(πu/2) − 1 + u)``
  with ``s = --mode-scale``) or uniform (``none``, ``cosmap``, ``sigma_sqrt``); index ``⌊u·N⌋`` picks the
  timestep (σ·1000) and its σ from the schedule;
* noisy latents ``(1 − σ)·x₀ + σ·ε``, target ``ε − x₀`` (the velocity the transformer predicts);
* loss: per-sample MSE times ``compute_loss_weighting_for_sd3`` (``sigma_sqrt``: σ⁻²; ``cosmap``:
  ``2 / (π·(1 − 2σ + 2σ²))``; otherwise 1), averaged over the batch.

The draws use the trainer's own generator (diffusers' helper draws from the global RNG), so a resumed
run repeats them exactly. Validation noises its images at fixed schedule indices (fixed σ).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from training.config import TrainConfig
from training.objective import Noised, Objective


class FlowObjective(Objective):
    """Rectified flow on the base's FlowMatch schedule (velocity prediction)."""

    prediction_type = "flow_matching"

    def __init__(self, scheduler_config: dict[str, Any], config: TrainConfig) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.scheme = config.weighting_scheme or "none"
        self.logit_mean = config.logit_mean
        self.logit_std = config.logit_std
        self.mode_scale = config.mode_scale

    def density(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """``compute_density_for_timestep_sampling``: ``u`` in [0, 1) per row."""
        if self.scheme == "logit_normal":
            normal = torch.randn(rows, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(normal)
        u = torch.rand(rows, generator=generator)
        if self.scheme == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """``compute_loss_weighting_for_sd3`` (None where it is 1)."""
        if self.scheme == "sigma_sqrt":
            return (sigmas**-2.0).float()
        if self.scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return None

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        u = self.density(latents.shape[0], generator)
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self._noised(latents, noise, indices, weighted=True)

    def _noised(
        self, latents: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor, *, weighted: bool
    ) -> Noised:
        timesteps = self.scheduler.timesteps[indices].float()
        sigmas = self.scheduler.sigmas[indices].float()
        sigma = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - sigma) * latents + sigma * noise
        return Noised(noisy, noise - latents, timesteps, self.loss_weights(sigmas) if weighted else None)
