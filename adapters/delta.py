"""Dense weight deltas ΔW of every adapter kind, in fp32, in the base weight's shape (pure functions).

One function per kind, written from the LyCORIS reference formulas (``lycoris/functional/*.py``, the
same ones A1111's and ComfyUI's loaders use); ``scale`` is the file's ``alpha / rank`` (canonical
tensors have it folded in already, so they pass 1.0):

* LoRA / LoCon: ``ΔW = (B · A) · scale`` with A ``[r, in(, kh, kw)]``, B ``[out, r(, 1, 1)]``;
* LoHa: ``ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · scale`` (``⊙``: elementwise), ``w·_a`` ``[out, r]``,
  ``w·_b`` ``[r, in·kh·kw]``; with Tucker cores (``hada_t1``/``hada_t2`` ``[r, r, kh, kw]``, a conv):
  ``rebuild_i = einsum('ijkl,jr,ip->prkl', t_i, w_i_b, w_i_a)`` and ``ΔW = rebuild_1 ⊙ rebuild_2 · scale``;
* LoKr: ``ΔW = (W1 ⊗ W2) · scale`` (Kronecker product), ``W1 = lokr_w1`` or ``lokr_w1_a · lokr_w1_b``
  ``[a, c]``, ``W2 = lokr_w2`` or ``lokr_w2_a · lokr_w2_b`` ``[b, d(·kh·kw)]`` or, with a Tucker core,
  ``einsum('ijkl,ip,jr->prkl', lokr_t2, lokr_w2_a, lokr_w2_b)``; ``a·b = out``, ``c·d = in``;
* full (``diff``): ``ΔW = diff`` (no alpha), and ``diff_b`` is added to the bias;
* DoRA: not additive by itself. With the LoRA part ``ΔW = up · down`` (alpha/rank folded in) the file's
  weight is ``W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps)``, the norm taken along the axis the magnitude ``m``
  declares (``dora_scale`` ``[1, in]``: per input column, LyCORIS' default; ``[out, 1]``: per output row;
  PEFT's ``dora_magnitude`` ``[out]``: per output row) and ``eps`` the fp32 machine epsilon LyCORIS adds.
  ``dora_module_delta`` turns it into a dense delta against the base weight ``W`` at weight ``s``:
  kohya/LyCORIS files (``dora_scale``) follow ComfyUI, ``W + s·(W' − W)`` — linear in ``s``; PEFT
  files (``dora_magnitude``) follow PEFT's ``use_dora`` forward, the weight inside the norm:
  ``m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖ − W`` — one delta per distinct ``s``. The parts of a fused weight
  (``dora_group``: Flux's and SD3's qkv, Flux's ``linear1``, split by ``adapters.community``) are computed
  as that fused weight, as ComfyUI and LyCORIS compute it on the original model: ``dora_fused_delta``
  stacks their ``W`` and ``ΔW`` row-wise (a per-input-column norm spans every fused row), decomposes the
  stack and splits ``D``'s rows back; ``dora_deltas`` does every DoRA module of an adapter.

Every result is reshaped to the base weight's shape (a linear LoRA stored 4-D, LoHa's flattened conv
factors). Nothing here knows about files, names or validation (``adapters.kinds`` checks shapes first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from adapters.errors import AdapterIncompatible
from adapters.kinds import dora_axis, dora_groups

__all__ = [
    "bias_delta",
    "dora_deltas",
    "dora_fused_delta",
    "dora_is_linear",
    "dora_module_delta",
    "dora_weight",
    "full_delta",
    "loha_delta",
    "lokr_delta",
    "lokr_factor",
    "lora_delta",
    "module_delta",
]


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32)


def lora_delta(
    down: torch.Tensor, up: torch.Tensor, shape: Sequence[int], scale: float = 1.0
) -> torch.Tensor:
    """LoRA/LoCon: ``B · A`` (the 1x1 up conv composed with the down conv is one conv)."""
    delta = _f32(up).flatten(1) @ _f32(down).flatten(1)
    return _scaled(delta.reshape(tuple(shape)), scale)


def loha_delta(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    shape: Sequence[int],
    scale: float = 1.0,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoHa: the Hadamard product of two low-rank matrices (optionally Tucker-factored convs)."""
    if t1 is not None and t2 is not None:
        first = torch.einsum("ijkl,jr,ip->prkl", _f32(t1), _f32(w1_b), _f32(w1_a))
        second = torch.einsum("ijkl,jr,ip->prkl", _f32(t2), _f32(w2_b), _f32(w2_a))
        delta = first * second
    else:
        delta = (_f32(w1_a) @ _f32(w1_b).flatten(1)) * (_f32(w2_a) @ _f32(w2_b).flatten(1))
    return _scaled(delta.reshape(tuple(shape)), scale)


def lokr_delta(
    w1: torch.Tensor,
    w2: torch.Tensor,
    shape: Sequence[int],
    scale: float = 1.0,
) -> torch.Tensor:
    """LoKr: ``W1 ⊗ W2`` for the two (already rebuilt, see ``lokr_factor``) Kronecker factors."""
    left, right = _f32(w1).contiguous(), _f32(w2).contiguous()
    if right.dim() == 4:
        left = left[:, :, None, None].contiguous()
    return _scaled(torch.kron(left, right).reshape(tuple(shape)), scale)


def lokr_factor(
    whole: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """One LoKr factor: the full matrix, ``a · b``, or the Tucker rebuild ``einsum(t, a, b)``."""
    if whole is not None:
        return _f32(whole)
    if a is None or b is None:
        raise ValueError("a LoKr factor needs either its full matrix or both low-rank halves")
    if t is not None:
        return torch.einsum("ijkl,ip,jr->prkl", _f32(t), _f32(a), _f32(b))
    return _f32(a) @ _f32(b)


def full_delta(diff: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A full-weight difference: the tensor itself (a 1x1 conv's may be stored 2-D and vice versa)."""
    return _f32(diff).reshape(tuple(shape))


def _scaled(delta: torch.Tensor, scale: float) -> torch.Tensor:
    return delta * scale if scale != 1.0 else delta


def module_delta(
    kind: str, factors: Mapping[str, torch.Tensor], shape: Sequence[int], scale: float = 1.0
) -> torch.Tensor:
    """ΔW of one module from its tensors keyed by role (``lora_A.weight``, ``hada_w1_a``, ``diff`` …)."""
    if kind == "lora":
        return lora_delta(factors["lora_A.weight"], factors["lora_B.weight"], shape, scale)
    if kind == "loha":
        return loha_delta(
            factors["hada_w1_a"],
            factors["hada_w1_b"],
            factors["hada_w2_a"],
            factors["hada_w2_b"],
            shape,
            scale,
            factors.get("hada_t1"),
            factors.get("hada_t2"),
        )
    if kind == "lokr":
        w1 = lokr_factor(factors.get("lokr_w1"), factors.get("lokr_w1_a"), factors.get("lokr_w1_b"))
        w2 = lokr_factor(
            factors.get("lokr_w2"), factors.get("lokr_w2_a"), factors.get("lokr_w2_b"), factors.get("lokr_t2")
        )
        return lokr_delta(w1, w2, shape, scale)
    if kind == "full":
        return _scaled(full_delta(factors["diff"], shape), scale)
    if kind == "dora":
        raise ValueError("a DoRA module's delta depends on the base weight: use dora_module_delta")
    raise ValueError(f"unknown adapter kind {kind!r}")


DORA_EPS = torch.finfo(torch.float32).eps


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str
) -> torch.Tensor:
    """``m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps)`` in fp32, the norm per output row (``axis="out"``) or per
    input column (``"in"``: over the output rows and the kernel)."""
    return _decompose(_f32(weight) + _f32(delta), magnitude, axis)


def _decompose(merged: torch.Tensor, magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """``dora_weight`` on ``merged = W + ΔW`` (fp32, a tensor of the caller's that is scaled in place)."""
    return merged.mul_(_direction_scale(_axis_norm(merged, axis), magnitude))


def _axis_norm(merged: torch.Tensor, axis: str) -> torch.Tensor:
    """‖merged‖ per output row (``out``) or per input column (``in``, over the rows and the kernel)."""
    dims = tuple(range(1, merged.dim())) if axis == "out" else (0, *range(2, merged.dim()))
    return torch.linalg.vector_norm(merged, dim=dims, keepdim=True)


def _direction_scale(norm: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``m / (‖W + ΔW‖ + eps)`` (``norm`` is consumed); a zero or non-finite norm is refused."""
    if not bool(torch.isfinite(norm).all()) or bool((norm == 0).any()):
        raise AdapterIncompatible(
            "a DoRA module's W + ΔW has a zero or non-finite norm along its magnitude's axis, so its "
            "direction is undefined",
            reason="dora_zero_norm",
            hint="The file does not fit this base model's weights; check it was trained on this base.",
        )
    return _f32(magnitude).reshape(norm.shape) / norm.add_(DORA_EPS)


def dora_is_linear(factors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a DoRA module's delta is linear in its weight (kohya/LyCORIS ``dora_scale``: ComfyUI's
    rule) rather than PEFT's (``dora_magnitude``: the weight inside the norm)."""
    return "dora_scale" in factors


def dora_module_delta(
    factors: Mapping[str, torch.Tensor], weight: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """The dense fp32 delta that moves the base ``weight`` to a DoRA module's weight at ``scale``."""
    shape = tuple(weight.shape)
    merged = lora_delta(factors["dora_down"], factors["dora_up"], shape)  # a new fp32 tensor: ΔW
    base = _f32(weight)
    if dora_is_linear(factors):
        magnitude = factors["dora_scale"]
        axis = dora_axis(tuple(magnitude.shape), shape)
        if axis is None:
            raise ValueError(f"dora_scale {list(magnitude.shape)} does not fit the weight {list(shape)}")
        return _scaled(_decompose(merged.add_(base), magnitude, axis).sub_(base), scale)
    merged = merged.mul_(scale) if scale != 1.0 else merged
    return _decompose(merged.add_(base), factors["dora_magnitude"], "out").sub_(base)


def dora_fused_delta(
    parts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[torch.Tensor], scale: float = 1.0
) -> list[torch.Tensor]:
    """The dense fp32 deltas of the parts of one fused weight under one kohya/LyCORIS DoRA (``dora_scale``
    ``[1, in]``, the same in every part): ``D`` of the fused weight ``cat(W_i)`` with ``ΔW = cat(ΔW_i)``,
    split back at the parts' rows, at ``scale`` (ComfyUI's rule, linear). The fused column norm is
    ``sqrt(Σ ‖W_i + ΔW_i‖²)`` over the parts, so nothing of the fused size is copied."""
    bases = [_f32(weight) for weight in weights]
    merged = [
        lora_delta(part["dora_down"], part["dora_up"], tuple(weight.shape)).add_(base)
        for part, weight, base in zip(parts, weights, bases, strict=True)
    ]
    norm = torch.stack([_axis_norm(v, "in") for v in merged]).square_().sum(0).sqrt_()
    factor = _direction_scale(norm, parts[0]["dora_scale"])
    return [_scaled(v.mul_(factor).sub_(base), scale) for v, base in zip(merged, bases, strict=True)]


def dora_deltas(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    weight_of: Callable[[str], torch.Tensor],
    scale: float = 1.0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(module, its dense fp32 delta at ``scale`` against the base weight ``weight_of(module)``) for each
    of an adapter's DoRA modules, one module (or one fused weight) at a time so that a caller keeping
    them in another dtype never holds them all in fp32: the parts of a fused weight
    (``adapters.kinds.dora_groups``) together (``dora_fused_delta``), every other module by itself
    (``dora_module_delta``)."""
    groups = dora_groups(modules)
    grouped = {module for members in groups.values() for module in members}
    for module, factors in modules.items():
        if module not in grouped:
            yield module, dora_module_delta(factors, weight_of(module), scale)
    for members in groups.values():
        deltas = dora_fused_delta([modules[m] for m in members], [weight_of(m) for m in members], scale)
        yield from zip(members, deltas, strict=True)


def bias_delta(kind: str, factors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The bias difference of a module (``diff_b`` of a full-weight diff), fp32; None for other kinds."""
    bias = factors.get("diff_b") if kind == "full" else None
    return _f32(bias).reshape(-1) if bias is not None else None
