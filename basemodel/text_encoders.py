"""Where the text encoders live and run: ``LORASWAP_TEXT_ENCODER_DEVICE=cuda|cpu|offload``.

A 24 GB card cannot hold Flux-dev's transformer (~23.8 GB in bf16) and its T5-XXL (~9.5 GB in bf16)
at once; diffusers users keep the encoders on the CPU or move them to the GPU only while they encode.
The same choices here (docs/operations.md, "Text encoders and GPU memory"):

* ``cuda`` (default): every text encoder stays beside the denoiser, on the serving device. Fastest;
  needs denoiser + encoders on the GPU (Flux-dev bf16: ~23.8 + 9.5 + 0.25 GB ≈ 34 GB).
* ``cpu``: the text encoders are kept on the CPU and run there; their outputs move to the GPU. Needs
  only the denoiser + VAE on the GPU and the encoders in host RAM; prompt encoding takes seconds
  (T5-XXL on CPU).
* ``offload``: the encoders are kept on the CPU and moved to the GPU only while a batch encodes its
  prompts, then moved back. Peak GPU memory is the denoiser plus the encoders during encoding (they
  are moved back before denoising); costs a host→device copy of the encoders per batch (~9.8 GB for
  Flux's: about 0.4 s on PCIe 4 ×16).

On a CPU-only server every choice is the same placement, and ``offload`` still goes through its moves
(between identical devices), so tests exercise it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from basemodel.families import ModelFamily

TextEncoderDevice = Literal["cuda", "cpu", "offload"]
CPU = torch.device("cpu")


class TextEncoderPlacement:
    """Places a pipeline's text encoders (LoRA-targetable and frozen) per the setting."""

    def __init__(self, pipe: Any, family: ModelFamily, mode: TextEncoderDevice, device: torch.device) -> None:
        self.mode = mode
        self.device = device  # the denoiser's
        names = (*family.text_encoders, *family.frozen_text_encoders)
        self.encoders = [module for name in names if (module := getattr(pipe, name, None)) is not None]
        self.moves = 0  # host↔device moves made (offload), for tests and metrics
        if mode != "cuda":
            self._move(CPU)

    @property
    def home(self) -> torch.device:
        """Where the encoders rest between batches."""
        return self.device if self.mode == "cuda" else CPU

    def _move(self, device: torch.device) -> None:
        for module in self.encoders:
            module.to(device)

    @contextmanager
    def encoding(self) -> Iterator[torch.device]:
        """The device to encode on for the ``with`` block (offload: the encoders move there and back)."""
        if self.mode != "offload":
            yield self.home
            return
        self._move(self.device)
        self.moves += 1
        try:
            yield self.device
        finally:
            self._move(CPU)
            self.moves += 1
