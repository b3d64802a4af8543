"""LoRA for ``nn.Linear``: ``x @ Aᵀ @ Bᵀ`` (what PEFT's ``lora_B(lora_A(x))`` computes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LinearLoRA:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]

    @classmethod
    def build(cls, module: nn.Linear, down: torch.Tensor, up: torch.Tensor) -> LinearLoRA:
        if down.ndim == 4:  # a 1x1-conv-shaped LoRA on a linear layer
            down, up = down.flatten(1), up.flatten(1)
        return cls(down.contiguous(), up.contiguous())

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        if down.dtype != x.dtype:  # a compact pair (16-bit file, fp32 CPU model): the cast is exact
            down, up = down.to(x.dtype), up.to(x.dtype)
        return F.linear(F.linear(x, down), up)

    def dense_delta(self) -> torch.Tensor:
        """``B @ A`` in fp32: [out, in]."""
        return self.up.float() @ self.down.float()

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes
