"""LoRA delta computation, one module kind per file."""

from __future__ import annotations

import torch
from torch import nn

from service.lora.layers.base import LoRAPair
from service.lora.layers.conv import ConvLoRA
from service.lora.layers.dense import DenseDelta
from service.lora.layers.dora import DoraDelta, dora_layers
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


def scaled_delta(layer: LoRAPair | DenseDelta | DoraDelta, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``layer``'s update for ``x`` at weight ``scale`` (only a PEFT DoRA is not linear in it)."""
    if isinstance(layer, DoraDelta):
        return layer.delta_at(x, scale)
    return layer.delta(x) * scale


def scaled_dense(layer: LoRAPair | DenseDelta | DoraDelta, scale: float) -> torch.Tensor:
    """``layer``'s fp32 weight delta at weight ``scale``."""
    if isinstance(layer, DoraDelta):
        return layer.dense_delta_at(scale)
    return layer.dense_delta() * scale


__all__ = [
    "ConvLoRA",
    "DenseDelta",
    "DoraDelta",
    "LinearLoRA",
    "LoRAPair",
    "dense_for",
    "dora_layers",
    "pair_for",
    "scaled_delta",
    "scaled_dense",
]
