"""LoRA delta computation, one module kind per file."""

from __future__ import annotations

import torch
from torch import nn

from service.lora.layers.base import LoRAPair
from service.lora.layers.conv import ConvLoRA
from service.lora.layers.dense import DenseDelta
from service.lora.layers.linear import LinearLoRA


def pair_for(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> LoRAPair:
    """The delta implementation matching ``module``'s kind."""
    if isinstance(module, nn.Conv2d):
        return ConvLoRA.build(module, down, up)
    if isinstance(module, nn.Linear):
        return LinearLoRA.build(module, down, up)
    raise TypeError(f"no LoRA layer for {type(module).__name__}")


def dense_for(module: nn.Module, kind: str, factors: dict[str, torch.Tensor]) -> DenseDelta:
    """The dense-delta layer of a LyCORIS kind (LoHa, LoKr, full diff) on ``module``."""
    return DenseDelta.build(module, kind, factors)


__all__ = ["ConvLoRA", "DenseDelta", "LinearLoRA", "LoRAPair", "dense_for", "pair_for"]
