"""DoRA modules as a dense delta against the loaded base weight, computed once at load.

A DoRA module's weight is ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` (``adapters.delta``), so its delta depends on
the base weight ``W``: ``build`` takes the weight as loaded (never a fused one) and computes the fp32
delta ``D = W' − W`` once, kept in the model's dtype. What the weight ``s`` of a request does depends on
the file (``adapters.delta.dora_module_delta``):

* kohya/LyCORIS (``dora_scale``, ComfyUI's rule ``W + s·D``): linear in ``s``, so ``delta(x)`` is
  ``F.linear(x, D)`` (or the conv) and the hooked, fused and mixed-batch paths scale it like any LoRA;
* PEFT (``dora_magnitude``, the weight inside the norm): ``linear`` is False and the callers use
  ``delta_at(x, s)`` / ``dense_delta_at(s)``, which compute ``D(s)`` once per distinct ``s`` (an LRU of
  ``CACHED_WEIGHTS`` entries; ``D(1)`` is the one built at load).

The parts of a fused original weight (``dora_group``: Flux's and SD3's qkv, Flux's ``linear1``) are built
together by ``dora_layers`` (``adapters.delta.dora_deltas``: ``D`` of the stacked weight, its rows split
back); they are kohya/LyCORIS files, so linear in ``s``, and never recomputed per weight.

The fused path fuses these same deltas (``dense_delta`` / ``dense_delta_at``), so a fuse costs no second
DoRA computation and draws what the hooked path draws.

Memory: ``D`` is as large as the base weight (plus the factors), like a LyCORIS dense delta; each cached
PEFT weight adds one more.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import dora_deltas, dora_is_linear, dora_module_delta
from service.lora.layers.base import conv_geometry

CACHED_WEIGHTS = 4  # PEFT DoRA: deltas kept for this many distinct weights besides 1.0


@dataclass
class DoraDelta:
    factors: dict[str, torch.Tensor]  # dora_down, dora_up and the magnitude, model device and dtype
    base: torch.Tensor  # the loaded base weight (a reference; never written)
    weight: torch.Tensor  # D at weight 1.0, model dtype
    linear: bool  # True: kohya/LyCORIS (W + s·D); False: PEFT (s inside the norm)
    conv: dict[str, Any] | None  # stride/padding/dilation/groups of a Conv2d base, None for a Linear
    _at: OrderedDict[float, torch.Tensor] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(
        cls,
        module: nn.Module,
        factors: Mapping[str, torch.Tensor],
        base: torch.Tensor,
        delta: torch.Tensor | None = None,
    ) -> DoraDelta:
        """The layer of one module; ``delta``: its fp32 ``D`` at weight 1.0 when computed already (the
        part of a fused weight), else computed here from ``factors`` and ``base``."""
        if not isinstance(module, nn.Conv2d | nn.Linear):
            raise TypeError(f"no DoRA layer for {type(module).__name__}")
        kept = {role: t.contiguous() for role, t in factors.items()}
        if delta is None:
            delta = dora_module_delta(kept, base)
        weight = delta.to(base.dtype).contiguous()
        conv = conv_geometry(module)
        return cls(kept, base, weight, dora_is_linear(kept), conv)

    def _apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, **self.conv)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update at weight 1.0 (scaled by the caller when ``linear``)."""
        return self._apply(x, self.weight)

    def delta_at(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """The update at weight ``scale``, already scaled."""
        if self.linear:
            return self.delta(x) * scale
        return self._apply(x, self._weight_at(float(scale)))

    def _weight_at(self, scale: float) -> torch.Tensor:
        if scale == 1.0:
            return self.weight
        with self._lock:
            cached = self._at.get(scale)
            if cached is not None:
                self._at.move_to_end(scale)
                return cached
        computed = dora_module_delta(self.factors, self.base, scale).to(self.weight.dtype).contiguous()
        with self._lock:
            self._at[scale] = computed
            while len(self._at) > CACHED_WEIGHTS:
                self._at.popitem(last=False)
        return computed

    def dense_delta(self) -> torch.Tensor:
        """The delta at weight 1.0 in fp32: the one built at load (model dtype; the hooked path adds the
        same), so fusing costs no second DoRA computation."""
        return self.weight.float()

    def dense_delta_at(self, scale: float) -> torch.Tensor:
        """The fp32 delta at weight ``scale`` (``scale · D`` for kohya files, ``D(scale)`` for PEFT's)."""
        if self.linear:
            return self.weight.float() * scale
        return self._weight_at(float(scale)).float()

    def bias_delta(self) -> torch.Tensor | None:
        return None

    @property
    def nbytes(self) -> int:
        tensors = (*self.factors.values(), self.weight, *self._at.values())
        return sum(t.nbytes for t in tensors)


def dora_layers(
    modules: Mapping[str, dict[str, torch.Tensor]],
    targets: Mapping[str, nn.Module],
    base_weight: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, DoraDelta]:
    """The layers of an adapter's DoRA modules (module → factors), their deltas against ``base_weight``
    (module → the weight as loaded; default: the module's current weight), fused parts together."""

    def base_of(module: str) -> torch.Tensor:
        base = base_weight(module) if base_weight is not None else targets[module].weight
        assert isinstance(base, torch.Tensor)
        return base.detach()

    return {
        m: DoraDelta.build(targets[m], modules[m], base_of(m), d) for m, d in dora_deltas(modules, base_of)
    }
