"""Adapter kinds (LoRA, LoHa, LoKr, full diff): their tensor roles, structure and shape rules.

Every kind is stored in its own canonical form, never converted into another kind:
``<component>.<module>.<role>`` with the roles below (LoRA's are ``lora_A.weight``/``lora_B.weight``,
the LyCORIS kinds keep LyCORIS's tensor names) and ``alpha / rank`` folded into the first factor
(``lora_B`` for LoRA, ``hada_w1_a`` for LoHa, ``lokr_w1``/``lokr_w1_a`` for LoKr; a full diff has no
scale), so every canonical file applies at weight 1.0. The checks here use shapes only — nothing is
multiplied out — so that opening a stored adapter stays cheap; ``adapters.delta`` does the math.

Shapes against a base weight ``[out, in]`` (Linear) or ``[out, in, kh, kw]`` (Conv2d), ``flat =
in·kh·kw`` (``in`` for a Linear):

* LoHa: ``hada_w1_a``/``hada_w2_a`` ``[out, r]``, ``hada_w1_b``/``hada_w2_b`` ``[r, flat]``; Tucker
  (convs): ``hada_t1``/``hada_t2`` ``[r, r, kh, kw]``, ``hada_w·_a`` ``[r, out]``, ``hada_w·_b`` ``[r, in]``;
* LoKr: ``W1 = lokr_w1 [a, c]`` or ``lokr_w1_a [a, r] · lokr_w1_b [r, c]``; ``W2 = lokr_w2`` ``[b, x]``
  or ``[b, d, kh, kw]``, or ``lokr_w2_a [b, r] · lokr_w2_b [r, x]``, or (Tucker) ``lokr_t2 [r, r, kh, kw]``
  with ``lokr_w2_a [r, b]``, ``lokr_w2_b [r, d]``; then ``a·b = out`` and ``c·d = in`` (4-D ``W2``) or
  ``c·x = flat`` with ``x`` a multiple of ``kh·kw`` (2-D ``W2``). The rank is that of the low-rank
  halves (both the same when both factors have them); a LoKr of two full factors has none and applies
  at scale 1.0 whatever its alpha, as in LyCORIS;
* full: ``diff`` the base weight's shape, optional ``diff_b`` ``[out]``;
* DoRA: ``dora_down`` ``[r, in(, kh, kw)]`` and ``dora_up`` ``[out, r(, 1, 1)]`` as a LoRA's halves, and
  one magnitude: ``dora_scale`` (kohya/LyCORIS files: ``[1, in(, 1, 1)]`` — one norm per input column,
  LyCORIS' default — or ``[out, 1(, 1, 1)]`` with ``wd_on_out``; the shape names the axis) or
  ``dora_magnitude`` ``[out]`` (PEFT's ``lora_magnitude_vector``: one norm per output row). Which of the
  two a module holds also names its weight rule (``adapters.delta.dora_module_delta``). A module that is
  part of a fused original (Flux's and SD3's qkv, Flux's ``linear1``; ``adapters.community`` splits
  them) with a per-input-column ``dora_scale`` also holds ``dora_group``, a scalar: the modules with the
  same value are the parts of one fused weight, whose column norm spans all of their rows
  (``adapters.delta.dora_deltas``; per-row magnitudes split exactly and need none). Group numbers are
  small integers (``0 ≤ n < MAX_DORA_GROUPS``: exact in fp16 and bf16).

A module with no rank (full diffs, LoKr of full factors) reports the rank of its ΔW's shape
(``min(out, flat)``) in the metadata; ``max_rank`` bounds only real low ranks (the file size limit
bounds the rest).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import torch

AdapterKind = Literal["lora", "loha", "lokr", "full", "dora", "embedding"]
KIND_LABELS: dict[str, str] = {
    "lora": "LoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "full": "full-weight diff",
    "dora": "DoRA",
    "embedding": "textual-inversion embedding",  # no module roles: adapters.embedding
}
ROLES: dict[str, tuple[str, ...]] = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
    "dora": ("dora_down", "dora_up", "dora_scale", "dora_magnitude", "dora_group"),
}
LYCORIS_KINDS = ("loha", "lokr", "full", "dora")
ROLE_KIND: dict[str, str] = {role: kind for kind, roles in ROLES.items() for role in roles}
LYCORIS_ROLES = tuple(role for kind in LYCORIS_KINDS for role in ROLES[kind])
FOLDED_INTO = {
    "lora": "lora_B.weight",
    "loha": "hada_w1_a",
    "lokr": ("lokr_w1", "lokr_w1_a"),
    "dora": "dora_up",
}
# every component a canonical key may start with: the denoisers (``basemodel.families``: UNet families,
# transformer families) and the text encoders a LoRA may target
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
CANONICAL_KEY = re.compile(
    rf"^(?P<module>(?:{'|'.join(COMPONENTS)})\..+)\."
    rf"(?P<role>{'|'.join(re.escape(r) for roles in ROLES.values() for r in roles)})$"
)

Shape = tuple[int, ...]
MAX_DORA_GROUPS = 256  # integers below this are exact in bf16, the narrowest dtype a file is stored in


class ShapeProblem(ValueError):
    """A module's tensors do not fit its kind's shape rules (the message says how)."""


class StructureProblem(ValueError):
    """A module lacks a tensor its kind needs, or has tensors of two alternatives."""


def split_key(key: str) -> tuple[str, str] | None:
    """A canonical key → (module, role), or None."""
    match = CANONICAL_KEY.match(key)
    return (match["module"], match["role"]) if match else None


def group(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Canonical keys → module → role → tensor, and the keys that are not canonical."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, tensor in tensors.items():
        parts = split_key(key)
        if parts is None:
            stray.append(key)
        else:
            modules.setdefault(parts[0], {})[parts[1]] = tensor
    return modules, stray


def kind_of(roles: Mapping[str, object] | set[str]) -> set[str]:
    """The kinds a set of roles belong to (one for a well-formed module)."""
    return {ROLE_KIND[role] for role in roles if role in ROLE_KIND}


def _shape(factors: Mapping[str, torch.Tensor], role: str) -> Shape | None:
    tensor = factors.get(role)
    return tuple(int(d) for d in tensor.shape) if tensor is not None else None


def _flat(base: Shape) -> int:
    return math.prod(base[1:])


def check_module(
    kind: str, factors: Mapping[str, torch.Tensor], base: Shape | None
) -> tuple[int | None, Shape]:
    """(rank or None, the ΔW shape) of one module; ``ShapeProblem``/``StructureProblem`` when malformed.

    ``base`` is the base weight's shape (None: check the tensors' consistency only).
    """
    if base is not None and len(base) not in (2, 4):
        raise ShapeProblem("module has no linear/conv weight in the base model")
    if kind == "loha":
        return _loha(factors, base)
    if kind == "lokr":
        return _lokr(factors, base)
    if kind == "full":
        return _full(factors, base)
    if kind == "dora":
        return _dora(factors, base)
    raise StructureProblem(f"unknown adapter kind {kind!r}")


def _need(factors: Mapping[str, torch.Tensor], *roles: str) -> list[Shape]:
    missing = [role for role in roles if role not in factors]
    if missing:
        raise StructureProblem(f"no {', '.join(missing)}")
    return [_shape(factors, role) or () for role in roles]


def _loha(factors: Mapping[str, torch.Tensor], base: Shape | None) -> tuple[int, Shape]:
    w1a, w1b, w2a, w2b = _need(factors, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    t1, t2 = _shape(factors, "hada_t1"), _shape(factors, "hada_t2")
    if (t1 is None) != (t2 is None):
        raise StructureProblem("hada_t1 and hada_t2 come together (Tucker) or not at all")
    described = (
        f"hada_w1_a {list(w1a)} / hada_w1_b {list(w1b)} / hada_w2_a {list(w2a)} / hada_w2_b {list(w2b)}"
    )
    if not all(len(s) == 2 for s in (w1a, w1b, w2a, w2b)):
        raise ShapeProblem(f"{described}: LoHa factors are 2-D")
    if t1 is not None and t2 is not None:
        rank = w1b[0]
        out, inner = w1a[1], w1b[1]
        if not (
            len(t1) == 4
            and t1 == t2
            and t1[:2] == (rank, rank)
            and w1a[0] == w2a[0] == w2b[0] == rank
            and (w2a[1], w2b[1]) == (out, inner)
        ):
            raise ShapeProblem(f"{described} / hada_t1 {list(t1)} / hada_t2 {list(t2)} are not a Tucker LoHa")
        shape: Shape = (out, inner, *t1[2:])
    else:
        rank = w1b[0]
        if not (w1a[1] == w2a[1] == w2b[0] == rank and w1a[0] == w2a[0] and w1b[1] == w2b[1]):
            raise ShapeProblem(f"{described} are not a LoHa of one rank")
        shape = (w1a[0], w1b[1])
    if rank < 1:
        raise ShapeProblem(f"{described}: rank 0")
    return rank, _fit(shape, base, described)


def _fit(shape: Shape, base: Shape | None, described: str) -> Shape:
    """``shape`` (as the factors give it) against the base weight: the base's shape, or a problem."""
    if base is None:
        return shape
    if shape == base or (len(shape) == 2 and shape == (base[0], _flat(base))):
        return base
    raise ShapeProblem(f"{described} give ΔW {list(shape)}, expected base weight {list(base)}")


def _lokr_half(
    factors: Mapping[str, torch.Tensor], n: int
) -> tuple[Shape, int | None]:  # (the factor's shape, its rank or None)
    whole, a, b = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
    tucker = _shape(factors, "lokr_t2") if n == 2 else None
    if whole in factors:
        if a in factors or b in factors or tucker is not None:
            raise StructureProblem(f"both {whole} and {a}/{b} (one or the other)")
        shape = _shape(factors, whole) or ()
        if len(shape) not in ((2,) if n == 1 else (2, 4)):
            raise ShapeProblem(f"{whole} {list(shape)} has the wrong number of dimensions")
        return shape, None
    sa, sb = _need(factors, a, b)
    if len(sa) != 2 or len(sb) != 2:
        raise ShapeProblem(f"{a} {list(sa)} / {b} {list(sb)} are not 2-D")
    if tucker is not None:
        rank = sb[0]
        if not (len(tucker) == 4 and tucker[:2] == (rank, rank) and sa[0] == rank):
            raise ShapeProblem(
                f"lokr_t2 {list(tucker)} / {a} {list(sa)} / {b} {list(sb)} are not a Tucker LoKr"
            )
        return (sa[1], sb[1], *tucker[2:]), rank
    if sa[1] != sb[0]:
        raise ShapeProblem(f"{a} {list(sa)} / {b} {list(sb)} do not multiply")
    return (sa[0], sb[1]), sb[0]


def _lokr(factors: Mapping[str, torch.Tensor], base: Shape | None) -> tuple[int | None, Shape]:
    (a, c), rank1 = _lokr_half(factors, 1)
    second, rank2 = _lokr_half(factors, 2)
    described = f"LoKr factors W1 {[a, c]} ⊗ W2 {list(second)}"
    if rank1 is not None and rank2 is not None and rank1 != rank2:
        raise ShapeProblem(f"{described}: the two factors have ranks {rank1} and {rank2}")
    rank = rank1 if rank1 is not None else rank2
    if rank is not None and rank < 1:
        raise ShapeProblem(f"{described}: rank 0")
    if len(second) == 4:
        shape: Shape = (a * second[0], c * second[1], *second[2:])
        return rank, _fit(shape, base, described)
    shape = (a * second[0], c * second[1])
    if base is not None and len(base) == 4 and second[1] % math.prod(base[2:]) != 0:
        raise ShapeProblem(f"{described}: W2's {second[1]} columns are not whole kernels of {list(base[2:])}")
    return rank, _fit(shape, base, described)


def _full(factors: Mapping[str, torch.Tensor], base: Shape | None) -> tuple[None, Shape]:
    (diff,) = _need(factors, "diff")
    bias = _shape(factors, "diff_b")
    if len(diff) not in (2, 4):
        raise ShapeProblem(f"diff {list(diff)} is not a linear or conv weight")
    shape = diff
    if base is not None:
        squeezed = len(base) == 4 and base[2:] == (1, 1) and diff == base[:2]
        unsqueezed = len(base) == 2 and diff == (*base, 1, 1)
        if diff != base and not (squeezed or unsqueezed):
            raise ShapeProblem(f"diff {list(diff)}, expected base weight {list(base)}")
        shape = base
    if bias is not None and bias != (shape[0],):
        raise ShapeProblem(f"diff_b {list(bias)}, expected [{shape[0]}]")
    return None, shape


def dora_axis(magnitude: Shape, weight: Shape) -> Literal["in", "out"] | None:
    """The axis a kohya/LyCORIS ``dora_scale`` of shape ``magnitude`` normalises a weight of shape
    ``weight`` along: ``"in"`` for ``[1, in(, 1, 1)]``, ``"out"`` for ``[out, 1(, 1, 1)]``, else None."""
    if len(magnitude) not in (2, len(weight)) or any(d != 1 for d in magnitude[2:]):
        return None
    out, inner = weight[0], weight[1]
    if magnitude[:2] == (1, inner):
        return "in"
    if magnitude[:2] == (out, 1):
        return "out"
    return None


def _dora(factors: Mapping[str, torch.Tensor], base: Shape | None) -> tuple[int, Shape]:
    down, up = _need(factors, "dora_down", "dora_up")
    scale, magnitude = _shape(factors, "dora_scale"), _shape(factors, "dora_magnitude")
    if (scale is None) == (magnitude is None):
        raise StructureProblem("one magnitude: dora_scale (kohya/LyCORIS) or dora_magnitude (PEFT)")
    described = f"dora_down {list(down)} / dora_up {list(up)}"
    if len(down) not in (2, 4) or len(up) != len(down) or (len(up) == 4 and up[2:] != (1, 1)):
        raise ShapeProblem(f"{described} are not a LoRA's down and up halves")
    rank = down[0]
    if up[1] != rank or rank < 1:
        raise ShapeProblem(f"{described} do not multiply")
    kernel = down[2:] if len(down) == 4 else ()
    weight = _fit((up[0], math.prod(down[1:])), base, described)
    if base is None:
        weight = (up[0], down[1], *kernel)
    if scale is not None and dora_axis(scale, weight) is None:
        raise ShapeProblem(
            f"dora_scale {list(scale)} fits neither [1, {weight[1]}] (per input column) nor "
            f"[{weight[0]}, 1] (per output row) of the weight {list(weight)}"
        )
    if magnitude is not None and magnitude != (weight[0],):
        raise ShapeProblem(f"dora_magnitude {list(magnitude)}, expected [{weight[0]}] (one per output row)")
    group = _shape(factors, "dora_group")
    if group is not None and (group not in ((), (1,)) or scale is None or dora_axis(scale, weight) != "in"):
        raise ShapeProblem(
            f"dora_group {list(group)}: a scalar, only beside a per-input-column dora_scale [1, {weight[1]}]"
        )
    return rank, weight


def dora_groups(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[int, list[str]]:
    """DoRA modules that are parts of one fused weight (``dora_group``): group number → its modules, in
    name order. ``StructureProblem`` for a number that is not a small integer, parts whose weights
    cannot be stacked (another input width or kernel) or that disagree on the fused weight's magnitude."""
    groups: dict[int, list[str]] = {}
    for module in sorted(modules):
        tensor = modules[module].get("dora_group")
        if tensor is None:
            continue
        value = float(tensor.detach().reshape(()).float())
        if not (value.is_integer() and 0 <= value < MAX_DORA_GROUPS):
            raise StructureProblem(
                f"dora_group of {module} is {value}; group numbers are integers in [0, {MAX_DORA_GROUPS})"
            )
        groups.setdefault(int(value), []).append(module)
    for members in groups.values():
        columns = {tuple(modules[m]["dora_down"].shape[1:]) for m in members}
        if len(columns) != 1:
            raise StructureProblem(
                f"DoRA modules {', '.join(members)} share a dora_group but not an input width "
                f"({sorted(list(c) for c in columns)}), so they are no parts of one fused weight"
            )
        first = modules[members[0]]["dora_scale"]
        if not all(torch.equal(modules[m]["dora_scale"], first) for m in members[1:]):
            raise StructureProblem(
                f"DoRA modules {', '.join(members)} share a dora_group but not their dora_scale (the fused "
                "weight's one magnitude)"
            )
    return groups


def reported_rank(rank: int | None, shape: Shape) -> int:
    """The rank the metadata records: the low rank, or that of ΔW's shape when there is none."""
    return rank if rank is not None else max(1, min(shape[0], _flat(shape)))


def uses_alpha(kind: str, factors: Mapping[str, object]) -> bool:
    """Whether ``alpha / rank`` scales this module (LyCORIS: not for full diffs nor full-factor LoKr)."""
    if kind == "lokr":
        return "lokr_w1" not in factors or "lokr_w2" not in factors
    return kind != "full"


def fold(
    kind: str, factors: Mapping[str, torch.Tensor], scale: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Copies of ``factors`` in ``dtype`` with ``scale`` multiplied into the first factor (fp32 math)."""
    targets = FOLDED_INTO.get(kind, ())
    target_roles = (targets,) if isinstance(targets, str) else targets
    out: dict[str, torch.Tensor] = {}
    for role, tensor in factors.items():
        if role in target_roles and scale != 1.0:
            out[role] = (tensor.detach().to(torch.float32) * scale).to(dtype).contiguous()
        else:
            out[role] = tensor.detach().to(dtype, copy=True).contiguous()
    return out
