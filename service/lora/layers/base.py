"""What every LoRA layer kind provides: ``delta(x)``, the low-rank update for input ``x``."""

from __future__ import annotations

from typing import Protocol

import torch


class LoRAPair(Protocol):
    """Down (A) and up (B) weights of one module, on the model's device and dtype."""

    @property
    def down(self) -> torch.Tensor: ...

    @property
    def up(self) -> torch.Tensor: ...

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x))`` with the base module's geometry (alpha is folded into ``up``)."""
        ...

    @property
    def nbytes(self) -> int: ...
