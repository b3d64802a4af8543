"""What every LoRA layer kind provides: ``delta(x)``, the update for input ``x`` (the hooked path), and
``dense_delta()``, the same update as a weight-space ΔW (the fused path)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class LoRAPair(Protocol):
    """Down (A) and up (B) weights of one module, on the model's device and dtype."""

    @property
    def down(self) -> torch.Tensor: ...

    @property
    def up(self) -> torch.Tensor: ...

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x))`` with the base module's geometry (alpha is folded into ``up``)."""
        ...

    def dense_delta(self) -> torch.Tensor:
        """ΔW in fp32 with alpha folded in, shaped like the base module's weight, so that the module with
        weight ``W + s·ΔW`` computes what the hooked path adds at scale ``s``. The fused path calls only
        this method, so every layer kind (LoRA, LoCon, LyCORIS) fuses through it."""
        ...

    @property
    def nbytes(self) -> int: ...


def conv_geometry(module: nn.Module) -> dict[str, Any] | None:
    """A Conv2d's stride, padding, dilation and groups, as ``F.conv2d`` takes them; None for a Linear."""
    if not isinstance(module, nn.Conv2d):
        return None
    return {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
    }
