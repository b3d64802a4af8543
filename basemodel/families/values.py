"""Plain values that cross the ``ModelFamily`` interface (``basemodel.families.base``): what detection
reads from a model (``ModelSignals``), what the denoiser takes besides latents and timestep
(``DenoiserInputs``, ``Conditioning``) and the model call the loop makes each step (``DenoiserCall``).

They hold tensors and configs only and import nothing of the families, so a family module, the
sampler and the trainer can name them without the interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class DenoiserInputs:
    """What the denoiser takes besides latents and timestep, for some rows of a batch.

    ``hidden`` is ``encoder_hidden_states`` ``[rows, tokens, width]``. ``added`` holds the other per-row
    inputs, named as the family's model call names them: SDXL's ``added_cond_kwargs`` (``text_embeds``
    ``[rows, projection]``, ``time_ids`` ``[rows, 6]``); SD3's and Flux's ``pooled_projections``; Flux-dev's
    ``guidance`` ``[rows]``. ``shared`` holds inputs that are the same for every row and are not stacked
    (Flux's ``txt_ids`` ``[tokens, 3]``). How they reach the model is ``ModelFamily.denoiser_call``'s
    business.
    """

    hidden: torch.Tensor
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)
    shared: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[DenoiserInputs]) -> DenoiserInputs:
        """Rows of several inputs stacked in order (every part has the same ``added`` keys; ``shared``
        is the first part's)."""
        keys = list(parts[0].added)
        return DenoiserInputs(
            torch.cat([p.hidden for p in parts]),
            {key: torch.cat([p.added[key] for p in parts]) for key in keys},
            parts[0].shared,
        )

    def to(self, device: torch.device) -> DenoiserInputs:
        """The same inputs on ``device`` (text encoders may run elsewhere than the denoiser)."""
        return DenoiserInputs(
            self.hidden.to(device),
            {key: value.to(device) for key, value in self.added.items()},
            {key: value.to(device) for key, value in self.shared.items()},
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a ``UNet2DConditionModel`` call."""
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": dict(self.added) or None}


UNetInputs = DenoiserInputs  # the name the UNet families' trainer code knows

# The denoiser call the loop makes each step: (model input, timestep) → prediction.
DenoiserCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conditioning:
    """One request's encoded prompt: ``cond`` rows and, under classifier-free guidance, ``uncond``."""

    cond: DenoiserInputs
    uncond: DenoiserInputs | None


@dataclass(frozen=True)
class ModelSignals:
    """What detection reads from a model: ``model_index.json``'s ``_class_name`` (None when unknown),
    the denoiser's config (``unet/config.json`` or ``transformer/config.json``), and the component
    classes (``model_index.json`` ``name → [library, class]``)."""

    pipeline_class: str | None
    denoiser: Mapping[str, Any]
    components: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def unet(self) -> Mapping[str, Any]:
        """The denoiser's config under the name the UNet families use."""
        return self.denoiser
