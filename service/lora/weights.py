"""An adapter arranged for running: per-module layers on the model's device and dtype.

LoRA modules become ``LinearLoRA`` / ``ConvLoRA`` pairs; LoHa, LoKr and full-diff modules (their own
canonical kinds, ``adapters.kinds``) become ``DenseDelta`` layers holding ΔW computed once here, and DoRA
modules ``DoraDelta`` layers holding their delta against the loaded base weight (``base_weight``: module
name → the weight as loaded, never a fused one; default: the module's current weight), the parts of a
fused original weight computed together (``service.lora.layers.dora.dora_layers``).
A textual-inversion embedding has no modules: its vectors (per text encoder) are moved as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.embedding import vectors_of
from adapters.kinds import ROLE_KIND, split_key
from service.lora.layers import DenseDelta, DoraDelta, LoRAPair, dense_for, dora_layers, pair_for

SUFFIX_A = ".lora_A.weight"
SUFFIX_B = ".lora_B.weight"

Layer = LoRAPair | DenseDelta | DoraDelta
"""What a module of a ``DeviceAdapter`` is: both give ``delta(x)``, ``dense_delta()`` and ``nbytes``."""


class NeedsValues(Exception):
    """``DeviceAdapter.build(views_only=True)`` met a tensor it would have to copy or compute from."""


@dataclass
class DeviceAdapter:
    """Ready-to-run weights of one adapter version, keyed by module name (``unet.…``/``text_encoder.…``)."""

    key: str
    modules: dict[str, Layer]
    nbytes: int = field(default=0)
    # a textual-inversion embedding's vectors: text encoder component → [n, width]
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
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
        base_weight: Callable[[str], torch.Tensor] | None = None,
        compact: bool = False,
        views_only: bool = False,
    ) -> DeviceAdapter:
        """Canonical tensors (``<module>.lora_A.weight`` / ``lora_B``, or a LyCORIS kind's roles) → layers.

        ``compact`` (a CPU model): LoRA pairs already on ``device`` in a dtype no wider than ``dtype``
        stay as they are (a 16-bit file's views on an fp32 model: no conversion at load, half the
        memory); their layers cast them per call, exactly. Other kinds are built in ``dtype``.

        ``views_only``: build only from the tensors as they are, reading no value (a cold load builds
        while the file's bytes are still arriving); ``NeedsValues`` where that is not possible (a copy
        or conversion, LyCORIS, DoRA or embedding vectors), before any value is read."""
        modules: dict[str, Layer] = {}
        lycoris: dict[str, dict[str, torch.Tensor]] = {}
        placed = torch.empty(0, device=device).device  # normalised: "cuda" → "cuda:0"

        def move(tensor: torch.Tensor) -> torch.Tensor:
            # tensors already in place (``materialise``'s output) skip ``.to``'s argument parsing
            if tensor.dtype == dtype and tensor.device == placed and tensor.is_contiguous():
                return tensor
            if views_only:
                raise NeedsValues(f"a {tensor.dtype} tensor to convert to {dtype} on {device}")
            return tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            narrow = tensor.device == placed and tensor.dtype.itemsize <= dtype.itemsize
            fits = compact and narrow and tensor.is_floating_point() and tensor.is_contiguous()
            return tensor if fits else move(tensor)

        for name, tensor in tensors.items():
            if name.endswith(SUFFIX_A):
                module_name = name[: -len(SUFFIX_A)]
                up = tensors[module_name + SUFFIX_B]
                modules[module_name] = pair_for(targets[module_name], keep(tensor), keep(up))
                continue
            if name.endswith(SUFFIX_B):  # built with its lora_A
                continue
            parts = split_key(name)
            if parts is not None and ROLE_KIND[parts[1]] != "lora":
                if views_only:
                    raise NeedsValues(f"{parts[1]} of {parts[0]}: a delta computed from its values")
                lycoris.setdefault(parts[0], {})[parts[1]] = move(tensor)
        dora: dict[str, dict[str, torch.Tensor]] = {}
        for module_name, factors in lycoris.items():
            kind = ROLE_KIND[next(iter(factors))]
            if kind == "dora":
                dora[module_name] = factors
            else:
                modules[module_name] = dense_for(targets[module_name], kind, factors)
        if dora:
            modules |= dora_layers(dora, targets, base_weight)
        found = vectors_of(tensors)
        if found and views_only:
            raise NeedsValues("embedding vectors, copied to the text encoders' device and dtype")
        vectors = {
            component: tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
            for component, tensor in found.items()
        }
        nbytes = sum(layer.nbytes for layer in modules.values())
        nbytes += sum(t.numel() * t.element_size() for t in vectors.values())
        return cls(key, modules, nbytes, vectors, placed)
