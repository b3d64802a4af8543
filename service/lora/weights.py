"""An adapter arranged for running: per-module layers on the model's device and dtype.

LoRA modules become ``LinearLoRA`` / ``ConvLoRA`` pairs; LoHa, LoKr and full-diff modules (their own
canonical kinds, ``adapters.kinds``) become ``DenseDelta`` layers holding ΔW computed once here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.kinds import ROLE_KIND, split_key
from service.lora.layers import DenseDelta, LoRAPair, dense_for, pair_for

SUFFIX_A = ".lora_A.weight"
SUFFIX_B = ".lora_B.weight"

Layer = LoRAPair | DenseDelta
"""What a module of a ``DeviceAdapter`` is: both give ``delta(x)``, ``dense_delta()`` and ``nbytes``."""


@dataclass
class DeviceAdapter:
    """Ready-to-run weights of one adapter version, keyed by module name (``unet.…``/``text_encoder.…``)."""

    key: str
    modules: dict[str, Layer]
    nbytes: int = field(default=0)
    device: torch.device | None = None  # where the layers live (None: unknown, assumed the model's)

    @classmethod
    def build(
        cls,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        targets: Mapping[str, nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        *,
        non_blocking: bool = False,
    ) -> DeviceAdapter:
        """Canonical tensors (``<module>.lora_A.weight`` / ``lora_B``, or a LyCORIS kind's roles) → layers."""
        modules: dict[str, Layer] = {}
        lycoris: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if name.endswith(SUFFIX_A):
                module_name = name[: -len(SUFFIX_A)]
                up = tensors[module_name + SUFFIX_B]
                modules[module_name] = pair_for(
                    targets[module_name],
                    tensor.to(device=device, dtype=dtype, non_blocking=non_blocking),
                    up.to(device=device, dtype=dtype, non_blocking=non_blocking),
                )
                continue
            parts = split_key(name)
            if parts is not None and ROLE_KIND[parts[1]] != "lora":
                moved = tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
                lycoris.setdefault(parts[0], {})[parts[1]] = moved
        for module_name, factors in lycoris.items():
            modules[module_name] = dense_for(targets[module_name], ROLE_KIND[next(iter(factors))], factors)
        placed = torch.empty(0, device=device).device  # normalised: "cuda" → "cuda:0"
        return cls(key, modules, sum(layer.nbytes for layer in modules.values()), placed)
