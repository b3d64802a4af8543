"""The fused path: targeted weights become ``W + Σ sᵢ·ΔWᵢ`` and are restored exactly afterwards.

``FusedWeights`` computes, for one adapter set with fixed scales, every targeted module's fused weight
in fp32 (``W.float() + Σ sᵢ · pairᵢ.dense_delta()``; a PEFT DoRA's own delta at ``sᵢ``) and casts it
once to the model's dtype into a new tensor. Fusing swaps that tensor in as the parameter's data;
restoring swaps the original tensor back. The original storage is never written, so after any number
of fuse/restore cycles the base weights are bit-identical to the loaded ones — nothing is ever
subtracted (diffusers' unfuse drift, #5313/#5604, cannot happen). The fused tensors are the memory this
costs: they are counted against a byte budget, and after a restore the last set's tensors stay *parked*
(within the budget) so that fusing the same set
again is a pointer swap, not a recomputation.

One ``FusedWeights`` exists per model (``for_model``): every ``LoRAModelManager`` over the same modules
shares it, so no manager can run a batch on weights another one left fused.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from service.lora.layers import scaled_dense
from service.lora.weights import DeviceAdapter

FuseKey = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class FuseTiming:
    """What one ``fuse`` call did: seconds fusing, seconds restoring another set first, and whether the
    fused tensors were computed (False: already fused, or a parked set swapped back in)."""

    fuse_s: float = 0.0
    restore_s: float = 0.0
    computed: bool = False


@dataclass(frozen=True)
class FuseSet:
    """Adapters (each with one scale for every row) to fuse together, in a canonical order."""

    adapters: tuple[tuple[DeviceAdapter, float], ...]

    @classmethod
    def of(cls, adapters: Sequence[tuple[DeviceAdapter, float]]) -> FuseSet:
        ordered = sorted(adapters, key=lambda pair: (pair[0].key, id(pair[0]), pair[1]))
        return cls(tuple((adapter, float(scale)) for adapter, scale in ordered))

    @property
    def key(self) -> FuseKey:
        return tuple((id(adapter), scale) for adapter, scale in self.adapters)

    def modules(self, prefix: str) -> list[str]:
        names = {n for adapter, _ in self.adapters for n in adapter.modules if n.startswith(prefix)}
        return sorted(names)


@dataclass
class _Fused:
    """The fused tensors of one set, and weak references that tell whether its adapters still live."""

    key: FuseKey
    refs: tuple[weakref.ref[DeviceAdapter], ...]
    tensors: dict[str, torch.Tensor]
    nbytes: int

    def matches(self, fuse_set: FuseSet) -> bool:
        if fuse_set.key != self.key:
            return False
        return all(ref() is adapter for ref, (adapter, _) in zip(self.refs, fuse_set.adapters, strict=True))


class FusedWeights:
    """Fuses at most one adapter set into one model's parameters at a time, within a byte budget."""

    _shared: weakref.WeakKeyDictionary[nn.Module, FusedWeights] = weakref.WeakKeyDictionary()
    _shared_lock = threading.Lock()

    def __init__(self, targets: Mapping[str, nn.Module], prefix: str, budget_bytes: int) -> None:
        """``targets``: module name → module; only names starting with ``prefix`` (e.g. ``"unet."``) fuse."""
        self.targets = dict(targets)
        self.prefix = prefix
        self.budget_bytes = budget_bytes
        self._originals: dict[str, torch.Tensor] = {}  # while fused: name → the loaded weight tensor
        self._active: _Fused | None = None  # swapped into the model now
        self._parked: _Fused | None = None  # restored, kept for a cheap re-fuse
        self._lock = threading.RLock()

    @classmethod
    def for_model(
        cls, model: nn.Module, targets: Mapping[str, nn.Module], prefix: str, budget_bytes: int
    ) -> FusedWeights:
        """The one instance for ``model`` (its budget set to the latest caller's)."""
        with cls._shared_lock:
            shared = cls._shared.get(model)
            if shared is None:
                shared = cls._shared[model] = cls(targets, prefix, budget_bytes)
            shared.budget_bytes = budget_bytes
            return shared

    # -- state --------------------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        return self._active is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of fused tensors held (the one swapped in, or the parked one)."""
        held = self._active or self._parked
        return held.nbytes if held is not None else 0

    @property
    def fused_modules(self) -> int:
        return len(self._originals)

    def loaded_weight(self, name: str) -> torch.Tensor:
        """Target ``name``'s weight as loaded: the original tensor while a fused one is swapped in."""
        with self._lock:
            original = self._originals.get(name)
            return original if original is not None else _weight(self.targets[name]).detach()

    def is_fused(self, fuse_set: FuseSet) -> bool:
        return self._active is not None and self._active.matches(fuse_set)

    def is_parked(self, fuse_set: FuseSet) -> bool:
        return self._parked is not None and self._parked.matches(fuse_set)

    def nbytes(self, fuse_set: FuseSet) -> int:
        """Bytes the fused tensors of ``fuse_set`` take (one per targeted weight, in the model's dtype)."""
        return sum(_weight(self.targets[n]).nbytes for n in fuse_set.modules(self.prefix))

    def parameters(self, fuse_set: FuseSet) -> int:
        return sum(_weight(self.targets[n]).numel() for n in fuse_set.modules(self.prefix))

    def fits(self, fuse_set: FuseSet) -> bool:
        return self.nbytes(fuse_set) <= self.budget_bytes

    def fusable(self, fuse_set: FuseSet) -> bool:
        """Whether fusing reproduces the set exactly: only weights are fused, so a layer that also changes
        the bias (a full diff with ``diff_b``) keeps the set on the hooked path."""
        for adapter, _ in fuse_set.adapters:
            for name, layer in adapter.modules.items():
                bias_delta = getattr(layer, "bias_delta", None)
                if name.startswith(self.prefix) and bias_delta is not None and bias_delta() is not None:
                    return False
        return True

    # -- fuse / restore -----------------------------------------------------------------------------
    def fuse(self, fuse_set: FuseSet) -> FuseTiming:
        """Make ``fuse_set`` the model's weights (restoring another fused set first). A set already
        fused costs nothing; a parked one a pointer swap per module."""
        with self._lock:
            if self.is_fused(fuse_set):
                return FuseTiming()
            restore_s = self.restore()
            started = time.perf_counter()
            fused = self._parked if self.is_parked(fuse_set) else None
            self._parked = None  # a parked other set's memory goes before the new set's is allocated
            computed = fused is None
            if fused is None:
                fused = self._compute(fuse_set)
            self._swap_in(fused)
            return FuseTiming(time.perf_counter() - started, restore_s, computed)

    def restore(self) -> float:
        """Put the loaded weight tensors back (exact: the originals were never written); seconds taken."""
        with self._lock:
            if self._active is None:
                return 0.0
            started = time.perf_counter()
            for name, original in self._originals.items():
                _weight(self.targets[name]).data = original
            self._originals.clear()
            self._parked, self._active = self._active, None
            return time.perf_counter() - started

    def release(self) -> None:
        """Restore and drop the parked tensors (their memory is freed)."""
        with self._lock:
            self.restore()
            self._parked = None

    def _compute(self, fuse_set: FuseSet) -> _Fused:
        tensors: dict[str, torch.Tensor] = {}
        for name in fuse_set.modules(self.prefix):
            weight = _weight(self.targets[name]).detach()
            delta: torch.Tensor | None = None  # Σ sᵢ·ΔWᵢ in fp32
            for adapter, scale in fuse_set.adapters:
                pair = adapter.modules.get(name)
                if pair is None:
                    continue
                dense = scaled_dense(pair, scale).to(device=weight.device, dtype=torch.float32)
                delta = dense if delta is None else delta.add_(dense)
            assert delta is not None
            fused = torch.empty_like(weight)  # same dtype, device and strides as the loaded weight
            if weight.dtype == torch.float32:
                torch.add(weight, delta, out=fused)
            else:
                fused.copy_(delta.add_(weight))  # W upcast exactly, summed in fp32, cast once
            tensors[name] = fused
        refs = tuple(weakref.ref(adapter) for adapter, _ in fuse_set.adapters)
        return _Fused(fuse_set.key, refs, tensors, sum(t.nbytes for t in tensors.values()))

    def _swap_in(self, fused: _Fused) -> None:
        try:
            for name, tensor in fused.tensors.items():
                weight = _weight(self.targets[name])
                self._originals[name] = weight.data
                weight.data = tensor
        except BaseException:
            for name, original in self._originals.items():
                _weight(self.targets[name]).data = original
            self._originals.clear()
            raise
        self._active = fused


def _weight(module: nn.Module) -> nn.Parameter:
    weight = module.weight
    assert isinstance(weight, nn.Parameter)
    return weight
