"""An adapter arranged for running: per-module LoRA pairs on the model's device and dtype."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from service.lora.layers import LoRAPair, pair_for

SUFFIX_A = ".lora_A.weight"
SUFFIX_B = ".lora_B.weight"


@dataclass
class DeviceAdapter:
    """Ready-to-run weights of one adapter version, keyed by module name (``unet.…``/``text_encoder.…``)."""

    key: str
    modules: dict[str, LoRAPair]
    nbytes: int = field(default=0)

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
        """Canonical tensors (``<module>.lora_A.weight`` / ``lora_B``) → per-module pairs."""
        modules: dict[str, LoRAPair] = {}
        for name, down in tensors.items():
            if not name.endswith(SUFFIX_A):
                continue
            module_name = name[: -len(SUFFIX_A)]
            up = tensors[module_name + SUFFIX_B]
            modules[module_name] = pair_for(
                targets[module_name],
                down.to(device=device, dtype=dtype, non_blocking=non_blocking),
                up.to(device=device, dtype=dtype, non_blocking=non_blocking),
            )
        return cls(key, modules, sum(pair.nbytes for pair in modules.values()))
