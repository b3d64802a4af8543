"""Injects LoRA hooks into the resident model once and activates adapters per forward scope.

Every targetable module (``Linear``/``Conv2d`` of the UNet and the text encoder(s)) gets one forward hook
at start-up. The hooks share a ``LoRAContext``: while it holds no adapters they return at once, so the
base model runs unchanged. ``activate`` sets the adapters (each with a scale, or per-row scales for
mixed batches) for the duration of a ``with`` block and always clears them after, so no state can
leak from one request into the next. Switching adapters therefore costs one attribute assignment,
whatever the number of resident adapters — there is no per-module loop as in ``set_adapters``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from basemodel.fingerprint import TARGETABLE
from service.lora.weights import DeviceAdapter


@dataclass(frozen=True)
class ActiveLoRA:
    """One adapter applied in a forward pass.

    ``scale`` applies to every row when ``rows`` is None; otherwise ``rows`` (a long tensor of batch
    indices) select the rows it applies to and ``scale`` is a tensor of per-row scales.
    """

    adapter: DeviceAdapter
    scale: float | torch.Tensor
    rows: torch.Tensor | None = None


class LoRAContext:
    def __init__(self) -> None:
        self.active: tuple[ActiveLoRA, ...] = ()


def _apply(name: str, context: LoRAContext, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    for lora in context.active:
        pair = lora.adapter.modules.get(name)
        if pair is None:
            continue
        if lora.rows is None:
            output = output + pair.delta(x) * lora.scale  # PEFT's order: result + B(A(x)) * scaling
        else:
            scale = torch.as_tensor(lora.scale, device=output.device).view(-1, *([1] * (output.ndim - 1)))
            delta = pair.delta(x.index_select(0, lora.rows)) * scale
            output = output.index_add(0, lora.rows, delta.to(output.dtype))
    return output


class LoRAModelManager:
    """Owns the hooks on one pipeline's LoRA components (the UNet and the family's text encoders)."""

    def __init__(self, components: Mapping[str, nn.Module]) -> None:
        """``components``: name → module, e.g. ``BaseModel.lora_components`` (``unet``,
        ``text_encoder`` and, for SDXL, ``text_encoder_2``); hooked modules are ``<name>.<path>``."""
        self.context = LoRAContext()
        self.targets: dict[str, nn.Module] = {}
        self._handles: list[RemovableHandle] = []
        for prefix, model in components.items():
            for name, module in model.named_modules():
                if isinstance(module, TARGETABLE):
                    full = f"{prefix}.{name}"
                    self.targets[full] = module
                    self._handles.append(module.register_forward_hook(self._hook(full)))

    def _hook(self, name: str) -> Any:
        context = self.context

        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not context.active:
                return None
            return _apply(name, context, args[0], output)

        return hook

    @contextmanager
    def activate(self, loras: Sequence[ActiveLoRA]) -> Iterator[None]:
        if self.context.active:
            raise RuntimeError("LoRA activation is not re-entrant")
        self.context.active = tuple(loras)
        try:
            yield
        finally:
            self.context.active = ()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
