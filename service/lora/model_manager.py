"""Applies adapters to the resident model: hooks only where an active adapter acts, or fused weights.

**Hooks.** A module carries a forward hook only while an adapter that touches it is active: ``activate``
installs hooks on exactly the modules the active adapters touch, in the components the caller runs
(``components``: the text encoders for prompt encoding, the denoiser for denoising), and an activation with
no adapter removes them, so a request without adapters runs no Python hook at all. Hooks are *sticky*
per component: they stay installed after the ``with`` block and the next activation only adds and
removes the difference, so switching between adapters that target the same modules costs one attribute
assignment, as before. Adapters that target the same modules end up sharing one module-name set object
(the first switch compares the names once), so that switch is an identity check whatever the number
of modules or of resident adapters. Outside an activation the hooks find no active adapter and return
at once. The hooks share a ``LoRAContext``; ``activate`` always clears it, so no state leaks from one
request into the next.

**Paths.** ``denoising`` picks, per batch, how the denoiser (UNet or transformer: the first component)
gets its adapters (``policy.py``): ``none``,
``fused`` (``fusion.py``: the weights replaced by ``W + Σ sᵢ·ΔWᵢ``, hook-free, restored exactly) or
``hooked`` (the row-indexed hooks for mixed batches). A fused set stays in place after the batch
(sticky) and is restored before any batch that asks for something else; a batch that fails or is
cancelled restores at once.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from basemodel.fingerprint import TARGETABLE
from service.lora.fusion import FusedWeights, FuseSet
from service.lora.layers import DoraDelta
from service.lora.policy import PATHS, PathMode, PathName, PathPolicy, Shape
from service.lora.weights import DeviceAdapter

if TYPE_CHECKING:
    from service.metrics import Metrics

MIB = 1 << 20
DEFAULT_FUSE_BUDGET_MB = 256  # SD1.5's attention projections in fp16: 178 MiB


@dataclass(frozen=True)
class ActiveLoRA:
    """One adapter applied in a forward pass.

    ``scale`` applies to every row when ``rows`` is None; otherwise ``rows`` (a long tensor of batch
    indices) select the rows it applies to and ``scale`` is a tensor of per-row scales.
    """

    adapter: DeviceAdapter
    scale: float | torch.Tensor
    rows: torch.Tensor | None = None


@dataclass
class Applied:
    """How a denoising batch got its adapters: the path, why, and what fusing/restoring cost."""

    path: PathName
    reason: str
    fuse_s: float = 0.0
    restore_s: float = 0.0
    requests: int = 1

    def seconds(self) -> dict[str, float]:
        """Stage seconds for the timings (only what happened)."""
        out = {"lora_fuse": self.fuse_s, "lora_restore": self.restore_s}
        return {stage: s for stage, s in out.items() if s > 0}


class LoRAContext:
    def __init__(self) -> None:
        self.active: tuple[ActiveLoRA, ...] = ()


def _apply(name: str, context: LoRAContext, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    for lora in context.active:
        pair = lora.adapter.modules.get(name)
        if pair is None:
            continue
        home = lora.adapter.device
        if home is not None and home != x.device:  # text encoders kept on the CPU, adapters on the GPU
            assert lora.rows is None, "row-indexed adapters act on the denoiser, beside their weights"
            moved = x.to(home)
            if isinstance(pair, DoraDelta) and not pair.linear:
                delta = _apply_at_each_weight(pair, lora, moved, torch.zeros_like(output, device=home))
                output = output + delta.to(output.device)
            else:
                output = output + pair.delta(moved).to(output.device) * lora.scale
            continue
        if isinstance(pair, DoraDelta) and not pair.linear:
            output = _apply_at_each_weight(pair, lora, x, output)
        elif lora.rows is None:
            output = output + pair.delta(x) * lora.scale  # PEFT's order: result + B(A(x)) * scaling
        else:
            scale = torch.as_tensor(lora.scale, device=output.device).view(-1, *([1] * (output.ndim - 1)))
            delta = pair.delta(x.index_select(0, lora.rows)) * scale
            output = output.index_add(0, lora.rows, delta.to(output.dtype))
    return output


def _apply_at_each_weight(
    pair: DoraDelta, lora: ActiveLoRA, x: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """A layer whose update is not linear in the weight (PEFT DoRA): one delta per distinct weight."""
    if lora.rows is None:
        return output + pair.delta_at(x, float(lora.scale))
    scales = torch.as_tensor(lora.scale, device=lora.rows.device)
    for value in torch.unique(scales).tolist():
        rows = lora.rows[scales == value]
        delta = pair.delta_at(x.index_select(0, rows), value)
        output = output.index_add(0, rows, delta.to(output.dtype))
    return output


@dataclass
class _Names:
    """An adapter's module names per component, cached while the adapter lives."""

    ref: weakref.ref[DeviceAdapter]
    by_component: dict[str, frozenset[str]] = field(default_factory=dict)


class LoRAModelManager:
    """Owns the hooks and the fused state on one pipeline's LoRA components."""

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        *,
        mode: PathMode = "auto",
        fuse_budget_bytes: int = DEFAULT_FUSE_BUDGET_MB * MIB,
        metrics: Metrics | None = None,
    ) -> None:
        """``components``: name → module, e.g. ``BaseModel.lora_components``, the denoiser first (``unet``
        or ``transformer``, then ``text_encoder`` …); targets are named ``<name>.<path>``. The first
        component is the one the fused path fuses (the text encoders stay hooked)."""
        self.context = LoRAContext()
        self.targets: dict[str, nn.Module] = {}
        for prefix, model in components.items():
            for name, module in model.named_modules():
                if isinstance(module, TARGETABLE):
                    self.targets[f"{prefix}.{name}"] = module
        self.components = tuple(components)
        self._handles: dict[str, RemovableHandle] = {}  # installed hooks by module name
        self._hooked: dict[str, frozenset[str]] = {}  # component → modules hooked now
        self._names: dict[int, _Names] = {}
        self.policy = PathPolicy(mode)
        self.metrics = metrics
        self.denoiser = next(iter(components), "unet")
        denoiser = components.get(self.denoiser)
        self.fusion = (
            FusedWeights.for_model(denoiser, self.targets, f"{self.denoiser}.", fuse_budget_bytes)
            if denoiser is not None
            else None
        )
        if metrics is not None:
            for path in PATHS:
                metrics.lora_path.labels(path=path)
            metrics.lora_fuse_budget.set(fuse_budget_bytes)
            self._publish()

    def loaded_weight(self, name: str) -> torch.Tensor:
        """The weight of target ``name`` as loaded (the original while a fused set is swapped in)."""
        if self.fusion is not None:
            return self.fusion.loaded_weight(name)
        weight = self.targets[name].weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach()

    # -- hooks ------------------------------------------------------------------------------------
    @property
    def hooked_modules(self) -> int:
        """Modules carrying a hook now."""
        return len(self._handles)

    def _hook(self, name: str) -> Any:
        context = self.context

        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not context.active:
                return None
            return _apply(name, context, args[0], output)

        return hook

    def _component_names(self, adapter: DeviceAdapter, component: str) -> frozenset[str]:
        cached = self._names.get(id(adapter))
        if cached is None or cached.ref() is not adapter:
            key = id(adapter)
            cached = self._names[key] = _Names(weakref.ref(adapter, lambda _: self._names.pop(key, None)))
        names = cached.by_component.get(component)
        if names is None:
            prefix = f"{component}."
            names = frozenset(n for n in adapter.modules if n.startswith(prefix))
            cached.by_component[component] = names
        return names

    def _ensure(self, component: str, names: frozenset[str]) -> frozenset[str]:
        """Hooks on exactly ``names`` in ``component``; returns the set now hooked (``names``, or the
        equal set that was hooked already)."""
        current = self._hooked.get(component, frozenset())
        if current is names or current == names:
            return current
        for name in current - names:
            self._handles.pop(name).remove()
        for name in names - current:
            self._handles[name] = self.targets[name].register_forward_hook(self._hook(name))
        self._hooked[component] = names
        return names

    def _hook_only(self, loras: Sequence[ActiveLoRA], components: Collection[str]) -> None:
        for component in components:
            sets = [self._component_names(lora.adapter, component) for lora in loras]
            names = sets[0] if len(sets) == 1 else frozenset().union(*sets)
            hooked = self._ensure(component, names)
            if len(loras) == 1 and hooked is not names:
                # the adapter targets exactly the hooked modules: it keeps the hooked set object, so a
                # switch between adapters on the same modules is an identity check, not a comparison
                # of every module name (337 on SD3.5 medium)
                self._names[id(loras[0].adapter)].by_component[component] = hooked

    @contextmanager
    def activate(
        self, loras: Sequence[ActiveLoRA], components: Collection[str] | None = None
    ) -> Iterator[None]:
        """``loras`` act in the ``components`` named (default: all) for the ``with`` block."""
        if self.context.active:
            raise RuntimeError("LoRA activation is not re-entrant")
        self._hook_only(loras, self.components if components is None else components)
        self.context.active = tuple(loras)
        try:
            yield
        finally:
            self.context.active = ()

    def remove(self) -> None:
        """Remove every hook and restore the loaded weights."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        if self.fusion is not None:
            self.fusion.release()
            self._publish()

    # -- paths --------------------------------------------------------------------------------------
    @contextmanager
    def denoising(
        self,
        requests: Sequence[Sequence[ActiveLoRA]],
        rows: Sequence[ActiveLoRA],
        *,
        steps: int,
        shape: Shape,
    ) -> Iterator[Applied]:
        """The denoiser's adapters for one denoising batch.

        ``requests``: each request's adapters (whole-request scales); ``rows``: the same as row-indexed
        activations for the hooked path; ``steps`` left to run; ``shape``: rows × latent h × w.
        """
        fuse_set = _uniform(requests)
        fusion = self.fusion
        wanted = any(requests)
        choice = self.policy.choose(
            wanted=wanted,
            uniform=fuse_set is not None,
            fusable=fusion is None or fuse_set is None or fusion.fusable(fuse_set),
            fits=fusion is not None and fuse_set is not None and fusion.fits(fuse_set),
            fused_now=fusion is not None and fuse_set is not None and fusion.is_fused(fuse_set),
            parked=fusion is not None and fuse_set is not None and fusion.is_parked(fuse_set),
            parameters=fusion.parameters(fuse_set) if fusion is not None and fuse_set is not None else 0,
            steps=steps,
            shape=shape,
        )
        applied = Applied(choice.path, choice.reason, requests=len(requests))
        if choice.path == "fused":
            assert fusion is not None and fuse_set is not None
            self._ensure(self.denoiser, frozenset())
            timing = fusion.fuse(fuse_set)
            applied.fuse_s, applied.restore_s = timing.fuse_s, timing.restore_s
            if timing.computed:
                self.policy.observe_fuse(timing.fuse_s, fusion.parameters(fuse_set))
        else:
            applied.restore_s = fusion.restore() if fusion is not None else 0.0
            self._hook_only(rows if choice.path == "hooked" else (), (self.denoiser,))
        if applied.restore_s:
            self.policy.observe_restore(applied.restore_s)
        self._observe(applied)
        if self.context.active:
            raise RuntimeError("LoRA activation is not re-entrant")
        self.context.active = tuple(rows) if choice.path == "hooked" else ()
        started = time.perf_counter()
        try:
            yield applied
        except BaseException:
            if fusion is not None and fusion.fused:  # a failed or cancelled batch leaves no fused weights
                self._observe(Applied(applied.path, "failed", restore_s=fusion.restore(), requests=0))
            raise
        finally:
            self.context.active = ()
        if steps:
            self.policy.observe_step(choice.path, shape, (time.perf_counter() - started) / steps)

    def _observe(self, applied: Applied) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        if applied.requests:
            metrics.lora_path.labels(path=applied.path).inc(applied.requests)
        if applied.fuse_s:
            metrics.lora_fuse.observe(applied.fuse_s)
        if applied.restore_s:
            metrics.lora_restore.observe(applied.restore_s)
        self._publish()

    def _publish(self) -> None:
        if self.metrics is None or self.fusion is None:
            return
        self.metrics.lora_fused_bytes.set(self.fusion.held_bytes)
        self.metrics.lora_fused_modules.set(self.fusion.fused_modules)


def _uniform(requests: Sequence[Sequence[ActiveLoRA]]) -> FuseSet | None:
    """The one adapter set every request uses with the same scales, or None (mixed, or no adapter)."""
    sets = [FuseSet.of([(lora.adapter, float(lora.scale)) for lora in loras]) for loras in requests]
    first = sets[0] if sets else None
    if first is None or not first.adapters or any(s.key != first.key for s in sets[1:]):
        return None
    return first
