"""LyCORIS adapters (LoHa, LoKr, full diff) as one dense ΔW per module, computed once at load.

``delta(x)`` is ``F.linear(x, ΔW, Δb)`` or ``F.conv2d`` with the base module's geometry, so the hooked
and mixed-batch (row-indexed) paths treat these kinds like any LoRA. ΔW is computed in fp32 from the
canonical factors (``adapters.delta``: scale already folded in) and kept in the model's dtype;
``dense_delta()`` recomputes the fp32 ΔW from the factors, which are kept too (for LoHa/LoKr they are
small; for a full diff in the model's dtype they are ΔW itself and are not stored twice).

Memory: ΔW is as large as the base module's weight (plus the factors); ``nbytes`` counts both for the
device cache's budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import bias_delta, module_delta
from service.lora.layers.base import conv_geometry


@dataclass(frozen=True)
class DenseDelta:
    kind: str  # adapters.kinds.AdapterKind other than "lora"
    factors: dict[str, torch.Tensor]  # role → tensor, on the model's device and dtype
    weight: torch.Tensor  # ΔW, the base weight's shape, model dtype
    bias: torch.Tensor | None  # Δb (a full diff's diff_b), model dtype
    conv: dict[str, Any] | None  # stride/padding/dilation/groups of a Conv2d base, None for a Linear

    @classmethod
    def build(cls, module: nn.Module, kind: str, factors: Mapping[str, torch.Tensor]) -> DenseDelta:
        if not isinstance(module, nn.Conv2d | nn.Linear):
            raise TypeError(f"no dense-delta layer for {type(module).__name__}")
        shape = tuple(module.weight.shape)
        dtype = module.weight.dtype if not factors else next(iter(factors.values())).dtype
        kept = {role: t.contiguous() for role, t in factors.items()}
        if kind == "full" and kept["diff"].shape == shape:
            weight = kept["diff"]  # ΔW is the diff itself: no second copy
        else:
            weight = module_delta(kind, kept, shape).to(dtype).contiguous()
        bias = bias_delta(kind, kept)
        conv = conv_geometry(module)
        return cls(kind, kept, weight, bias.to(dtype) if bias is not None else None, conv)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, **self.conv)

    def dense_delta(self) -> torch.Tensor:
        """The fp32 ΔW (base weight's shape), recomputed from the factors."""
        return module_delta(self.kind, self.factors, tuple(self.weight.shape))

    def bias_delta(self) -> torch.Tensor | None:
        """The fp32 Δb of a full diff with ``diff_b``; None otherwise (LoRA, LoHa, LoKr have none)."""
        return bias_delta(self.kind, self.factors)

    @property
    def nbytes(self) -> int:
        seen: dict[int, int] = {}
        for tensor in (*self.factors.values(), self.weight, *([self.bias] if self.bias is not None else [])):
            seen[tensor.data_ptr()] = max(seen.get(tensor.data_ptr(), 0), tensor.nbytes)
        return sum(seen.values())
