"""What the denoiser is conditioned on in training, for any model family.

A caption becomes token ids (one row per text encoder) and then the text conditioning (SD1.x/SD2.x: the
text encoder's last hidden states; SDXL: both encoders' penultimate hidden states and the pooled
projection), computed every step while a text-encoder LoRA trains and cached once while the encoders
are frozen. An image adds its size conditioning (SDXL: ``time_ids`` from its original size, the crop
taken from it and the size trained at; nothing for SD1.x/SD2.x). SD3 and Flux add T5, which is
frozen: its states are cached with the CLIPs' and recomputed (without gradients of its own) only while
a CLIP LoRA trains. The family
(``basemodel.families``) decides what each of these is; this module only batches and places them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basemodel.families import ModelFamily, UNetInputs
from training.data.buckets import Crop

Tensors = dict[str, torch.Tensor]


def stack(rows: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Per-key ``torch.stack`` of equal-keyed rows (``{}`` for rows without keys)."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]} if rows else {}


@dataclass(frozen=True)
class Conditioner:
    """The family's training conditioning on one pipeline (whose modules carry the LoRA)."""

    family: ModelFamily
    pipe: Any
    guidance: float = 1.0  # the embedded guidance a distilled denoiser (Flux-dev) trains at

    @property
    def denoiser(self) -> nn.Module:
        """The family's denoiser (the UNet; the transformer on SD3/Flux), which carries the LoRA."""
        return self.family.denoiser_module(self.pipe)

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        """Component name → text encoder, in the family's order."""
        return {name: getattr(self.pipe, name) for name in self.family.text_encoders}

    @property
    def frozen_encoders(self) -> dict[str, nn.Module]:
        """Text encoders the family runs but never adapts (T5 on SD3/Flux), when loaded."""
        found = {name: getattr(self.pipe, name, None) for name in self.family.frozen_text_encoders}
        return {name: module for name, module in found.items() if module is not None}

    @property
    def all_encoders(self) -> dict[str, nn.Module]:
        """Every text encoder the conditioning runs: the adaptable ones, then the frozen ones."""
        return self.text_encoders | self.frozen_encoders

    @property
    def text_keys(self) -> tuple[str, ...]:
        """The tensors of one caption's text conditioning (what the embedding cache holds)."""
        return self.family.training_text_keys

    def tokenize(self, captions: Sequence[str]) -> Tensors:
        return self.family.tokenize(self.pipe, captions)

    @property
    def frozen_keys(self) -> tuple[str, ...]:
        """The tensors of a caption's never-trained text part (T5's states), cached even while a
        text-encoder LoRA trains."""
        return self.family.frozen_text_keys

    def encode_text(
        self, tokens: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor] | None = None
    ) -> Tensors:
        return self.family.training_text(self.pipe, tokens, frozen)

    def encode_frozen(self, tokens: Mapping[str, torch.Tensor]) -> Tensors:
        return self.family.frozen_text(self.pipe, tokens)

    def size_conditioning(self, crop: Crop, flipped: bool = False) -> Tensors:
        """The family's per-image conditioning of an image cut by ``crop`` (mirrored when ``flipped``)."""
        (width, height), (target_w, target_h) = crop.original, crop.target
        return self.family.size_conditioning((height, width), crop.top_left(flipped), (target_h, target_w))

    def unet_inputs(
        self,
        *,
        tokens: Mapping[str, torch.Tensor],
        text: Mapping[str, torch.Tensor] | None,
        added: Mapping[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        frozen: Mapping[str, torch.Tensor] | None = None,
    ) -> UNetInputs:
        """A batch's UNet inputs: cached ``text`` (cast to ``dtype``) or the text encoders run on
        ``tokens`` (with gradients when they train; ``frozen``: the cached never-trained part), plus
        the ``added`` size conditioning."""
        if text is None:
            cached = {key: value.to(device, dtype) for key, value in (frozen or {}).items()}
            computed = self.encode_text(
                {name: ids.to(device) for name, ids in tokens.items()}, cached or None
            )
        else:
            computed = {key: value.to(device, dtype) for key, value in text.items()}
        placed = {key: value.to(device, dtype) for key, value in added.items()}
        return self.family.training_inputs(computed, placed)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: UNetInputs) -> torch.Tensor:
        """The denoiser's prediction for noisy latents (``[rows, channels, h, w]``) at ``timesteps``."""
        return self.family.training_prediction(self.pipe, noisy, timesteps, inputs, guidance=self.guidance)
