"""LoRA for ``nn.Conv2d`` (LoCon): A is a conv with the base kernel/stride/padding, B a 1x1 conv."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvLoRA:
    down: torch.Tensor  # [r, in, kh, kw]
    up: torch.Tensor  # [out, r, 1, 1]
    stride: Any
    padding: Any
    dilation: Any

    @classmethod
    def build(cls, module: nn.Conv2d, down: torch.Tensor, up: torch.Tensor) -> ConvLoRA:
        if down.ndim == 2:  # a linear-shaped LoRA on a 1x1 conv
            down, up = down[:, :, None, None], up[:, :, None, None]
        return cls(down.contiguous(), up.contiguous(), module.stride, module.padding, module.dilation)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        if down.dtype != x.dtype:  # a compact pair (16-bit file, fp32 CPU model): the cast is exact
            down, up = down.to(x.dtype), up.to(x.dtype)
        hidden = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(hidden, up)

    def dense_delta(self) -> torch.Tensor:
        """The kernel of ``conv(conv(x, A), B)`` with B 1×1, in fp32, shaped like the base conv's weight:
        ``ΔW[o, i, kh, kw] = Σ_r B[o, r] · A[r, i, kh, kw]``."""
        down = self.down.float()
        return (self.up.float().flatten(1) @ down.flatten(1)).view(self.up.shape[0], *down.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes
