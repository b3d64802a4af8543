"""LyCORIS adapter files (LoHa, LoKr, full-weight diff) → their canonical form, and back out to kohya.

Accepted keys, one kind per file:

* kohya/LyCORIS naming: ``lora_unet_<name>.<role>``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the
  text encoders, with ``<name>`` looked up exactly as for kohya LoRAs (diffusers-style or LDM/SGM UNet
  names through ``adapters.kohya_ldm``, text-encoder names with or without ``text_model_``) and
  ``<role>`` one of ``hada_w1_a`` … ``hada_t2``, ``lokr_w1`` … ``lokr_t2``, ``diff``, ``diff_b``, plus
  ``<name>.alpha``;
* the canonical naming ``<component>.<module>.<role>`` (what ``adapters convert --to diffusers`` writes
  and the registry stores), whose scale is already folded in.

Scaling follows LyCORIS (``lycoris/modules/loha.py``, ``lokr.py``, ``full.py``): LoHa and LoKr with a
low-rank half apply ``alpha / rank`` (rank: ``hada_w1_b.shape[0]``, ``lokr_w·_b.shape[0]``; no alpha:
``alpha = rank``); a LoKr of two full factors and a full diff apply 1.0. The scale is folded into the
first factor (``adapters.kinds.fold``), so stored adapters apply at weight 1.0 like LoRAs.

DoRA files are read here too: kohya/LyCORIS ``<name>.lora_down.weight`` / ``.lora_up.weight`` /
``.dora_scale`` (/ ``.alpha``) and PEFT ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` /
``.lora_magnitude_vector`` (optionally ``base_model.model.``-prefixed, ``.default``-infixed or
``.weight``-suffixed; alpha from ``.alpha`` keys or the ``alpha`` argument, as for PEFT LoRAs). Their
canonical form is the ``dora`` kind (``adapters.kinds``): ``dora_down``, ``dora_up`` (alpha/rank folded
in) and the magnitude as ``dora_scale`` (kept in the file's shape, which names its axis) or
``dora_magnitude`` ``[out]``.

Refused (typed, nothing stored): a file that mixes kinds (LoRA keys beside LoHa keys, LoHa beside
LoKr, DoRA modules beside plain LoRA modules …) with ``mixed_adapter_kinds``; a module with a missing or
doubled factor (``incomplete_pair``); shapes that do not fit the base module, a magnitude of the wrong
shape included (``shape_mismatch``); unknown keys (``unknown_layout``); and, before any of this,
LoCon-Tucker (``lora_mid``) and OFT (``unsupported_adapter_type``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from adapters.errors import AdapterInvalid
from adapters.kinds import (
    CANONICAL_KEY,
    COMPONENTS,
    KIND_LABELS,
    LYCORIS_ROLES,
    ROLE_KIND,
    check_module,
    fold,
    group,
    uses_alpha,
)
from adapters.metadata import SourceFormat
from adapters.normalise import (
    KOHYA_COMPONENTS,
    NormaliseInfo,
    Role,
    _check_components,
    _kohya_table,
    _ParsedKey,
    _path_variants,
)
from adapters.validate import DTYPE_NAMES, check_alpha, check_kind_modules, check_modules_exist, first
from basemodel.fingerprint import Architecture

_ROLE_PATTERN = "|".join(re.escape(r) for r in (*LYCORIS_ROLES, "lora_down.weight", "lora_up.weight"))
KOHYA_KEY = re.compile(
    rf"^(?P<prefix>{'|'.join(sorted(map(re.escape, KOHYA_COMPONENTS), key=len, reverse=True))})"
    rf"(?P<name>.+?)\.(?P<role>{_ROLE_PATTERN}|alpha)$"
)
CANONICAL_ALPHA = re.compile(rf"^(?P<module>(?:{'|'.join(COMPONENTS)})\..+)\.alpha$")
PEFT_DORA = re.compile(r"\.(?P<role>lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?:\.weight)?$")
PEFT_DORA_ROLES = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_magnitude_vector": "dora_magnitude",
}
DORA_MAGNITUDES = ("dora_scale", "dora_magnitude")
DORA_HALVES = {"lora_A.weight": "dora_down", "lora_B.weight": "dora_up"}


def is_lycoris(tensors: Mapping[str, object]) -> bool:
    """Whether any key names a LyCORIS tensor role (``….hada_w1_a``, ``….lokr_w1``, ``….diff``,
    ``….dora_scale`` …) or PEFT's DoRA magnitude."""
    return any(key.rsplit(".", 1)[-1] in LYCORIS_ROLES or "lora_magnitude_vector" in key for key in tensors)


@dataclass
class _Module:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def normalise_lycoris(
    tensors: Mapping[str, torch.Tensor],
    architecture: Architecture,
    *,
    max_rank: int | None = None,
    alpha: float | Mapping[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], NormaliseInfo]:
    """A LyCORIS or DoRA file (dtype and finiteness already checked) → canonical tensors, scale folded.

    ``alpha`` (one number, or module → alpha) stands in for ``.alpha`` keys a PEFT DoRA file lacks."""
    tensors = _peft_dora_keys(tensors)
    parsed, roles = _parse(tensors)
    layout: SourceFormat = "kohya" if any(p.layout == "kohya" for p in parsed.values()) else "diffusers"
    if len({p.layout for p in parsed.values()}) > 1:
        raise AdapterInvalid(
            "unknown key layout: kohya (lora_unet_…) and canonical (unet.…) LyCORIS keys are mixed "
            "in one file",
            reason="unknown_layout",
        )
    _check_components(parsed, architecture)
    modules = _group(tensors, parsed, roles, architecture)
    for parts in modules.values():
        _as_dora(parts)
    kind = _kind(modules)
    ranks, low_ranks = check_kind_modules(
        kind,
        {m: {r: t for r, t in parts.tensors.items() if r != "alpha"} for m, parts in modules.items()},
        {m: architecture.shape_of(m) for m in modules},
        max_rank,
        label=KIND_LABELS[kind],
        keys={m: parts.keys.values() for m, parts in modules.items()},
    )
    dtypes = {t.dtype for parts in modules.values() for r, t in parts.tensors.items() if r != "alpha"}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    canonical: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    alpha_default = alpha
    for module, parts in sorted(modules.items()):
        factors = {r: t for r, t in parts.tensors.items() if r != "alpha"}
        scale = 1.0
        alpha = float(ranks[module])
        default = alpha_default.get(module) if isinstance(alpha_default, Mapping) else alpha_default
        if module in low_ranks and uses_alpha(kind, factors):
            alpha = _alpha(module, parts, low_ranks[module], default)
            scale = alpha / low_ranks[module]
        alphas[module] = alpha
        for role, tensor in fold(kind, factors, scale, dtype).items():
            canonical[f"{module}.{role}"] = tensor
    return canonical, NormaliseInfo(layout, ranks, alphas, DTYPE_NAMES[dtype], kind)


def _peft_dora_keys(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """PEFT DoRA keys (``[base_model.model.]<component>.<module>.lora_A[.default].weight``,
    ``….lora_magnitude_vector[.default][.weight]``) → canonical keys; a file without a PEFT magnitude
    as is."""
    if not any("lora_magnitude_vector" in key for key in tensors):
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        stem = key.removeprefix("base_model.model.")
        match = PEFT_DORA.search(stem)
        if match is None:
            out[key] = tensor
            continue
        role = PEFT_DORA_ROLES[match["role"]]
        if (
            role == "dora_magnitude"
            and tensor.dim() > 1
            and sorted(tensor.shape)[:-1] == [1] * (tensor.dim() - 1)
        ):
            tensor = tensor.reshape(-1)  # a conv's [1, out, 1, 1] magnitude: one per output channel
        new = f"{stem[: match.start()]}.{role}"
        if new in out:
            raise AdapterInvalid(f"two keys give {new} (e.g. {key})", reason="duplicate_key")
        out[new] = tensor
    return out


def _as_dora(parts: _Module) -> None:
    """A module with a DoRA magnitude: its LoRA halves become ``dora_down`` / ``dora_up``."""
    if not any(role in parts.tensors for role in DORA_MAGNITUDES):
        return
    known = {
        *DORA_MAGNITUDES,
        *DORA_HALVES,
        *DORA_HALVES.values(),
        "dora_group",
        "alpha",
    }  # file or canonical
    other = sorted(set(parts.tensors) - known)
    if other:
        raise AdapterInvalid(
            f"DoRA on a LoHa/LoKr/full module is not supported (keys {parts.keys[other[0]]} beside a "
            "magnitude); DoRA on LoRA/LoCon modules is",
            reason="unsupported_adapter_type",
            detail={"keys": sorted(parts.keys.values())},
        )
    for old, new in DORA_HALVES.items():
        if old in parts.tensors:
            parts.tensors[new] = parts.tensors.pop(old)
            parts.keys[new] = parts.keys.pop(old)


def _parse(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, _ParsedKey], dict[str, str]]:
    """key → its name (as normalise parses kohya/diffusers names), and key → canonical role."""
    parsed: dict[str, _ParsedKey] = {}
    roles: dict[str, str] = {}
    unknown: list[str] = []
    for key in tensors:
        match = KOHYA_KEY.match(key)
        if match is not None:
            role = match["role"]
            parsed[key] = _ParsedKey("kohya", KOHYA_COMPONENTS[match["prefix"]], match["name"], _role(role))
            roles[key] = _canonical_role(role)
            continue
        canonical = CANONICAL_KEY.match(key) or CANONICAL_ALPHA.match(key)
        if canonical is not None:
            component, path = canonical["module"].split(".", 1)
            role = canonical.groupdict().get("role") or "alpha"
            parsed[key] = _ParsedKey("diffusers", component, path, _role(role))
            roles[key] = role
            continue
        unknown.append(key)
    if unknown:
        shown = first(unknown)
        raise AdapterInvalid(
            f"unknown key layout: {len(unknown)} key(s) are not LyCORIS keys in a known layout, "
            f"e.g. {shown[0]}",
            reason="unknown_layout",
            detail={"keys": shown, "count": len(unknown)},
            hint="Accepted LyCORIS keys: lora_unet_*/lora_te*_* (or unet.*/text_encoder.*) with "
            "hada_w1_a…hada_t2 (LoHa), lokr_w1…lokr_t2 (LoKr), diff/diff_b (full) and alpha. "
            "See docs/adapters.md.",
        )
    return parsed, roles


def _role(role: str) -> Role:
    return "alpha" if role == "alpha" else "down"  # normalise's role field: only alpha-or-not matters here


def _canonical_role(role: str) -> str:
    return {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(role, role)


def _group(
    tensors: Mapping[str, torch.Tensor],
    parsed: Mapping[str, _ParsedKey],
    roles: Mapping[str, str],
    architecture: Architecture,
) -> dict[str, _Module]:
    table = _kohya_table(architecture, parsed.values())
    modules: dict[str, _Module] = {}
    absent: set[str] = set()
    for key, part in parsed.items():
        module = _resolve(part, architecture, table)
        if module is None:
            absent.add(f"{part.component}.{part.name}")
            continue
        role = roles[key]
        entry = modules.setdefault(module, _Module())
        if role in entry.tensors:
            raise AdapterInvalid(
                f"keys {entry.keys[role]} and {key} both give {role} for module {module}",
                reason="duplicate_key",
            )
        entry.tensors[role] = tensors[key]
        entry.keys[role] = key
    if absent:
        check_modules_exist(absent, architecture)
    alone = [m for m, parts in modules.items() if set(parts.tensors) == {"alpha"}]
    if alone:
        raise AdapterInvalid(
            f"module {alone[0]} has an alpha but no weights",
            reason="incomplete_pair",
            detail={"modules": first(alone)},
        )
    return modules


def _resolve(
    part: _ParsedKey, architecture: Architecture, table: Mapping[tuple[str, str], str]
) -> str | None:
    if part.layout == "kohya":
        return table.get((part.component or "", part.name))
    component = part.component or ""
    for path in _path_variants(component, part.name):
        if f"{component}.{path}" in architecture.modules:
            return f"{component}.{path}"
    return None


def _kind(modules: Mapping[str, _Module]) -> str:
    kinds: dict[str, set[str]] = {}
    for module, parts in modules.items():
        for role in parts.tensors:
            if role != "alpha":
                kinds.setdefault(ROLE_KIND[role], set()).add(module)
    if len(kinds) != 1:
        found = {KIND_LABELS[k]: first(v, 2) for k, v in sorted(kinds.items())}
        raise AdapterInvalid(
            f"the file mixes adapter kinds ({', '.join(found)}); one kind per file is supported",
            reason="mixed_adapter_kinds",
            detail={"kinds": found},
            hint="Split the file into one adapter per kind (LoRA, LoHa, LoKr, full diff) and register each.",
        )
    return next(iter(kinds))


def _alpha(module: str, parts: _Module, rank: int, default: float | None = None) -> float:
    tensor = parts.tensors.get("alpha")
    if tensor is None:
        return check_alpha(module, float(default), rank) if default is not None else float(rank)
    if tensor.numel() != 1:
        raise AdapterInvalid(
            f"alpha for {module} has shape {list(tensor.shape)}; a scalar is expected",
            reason="bad_alpha",
            detail={"keys": [parts.keys["alpha"]]},
        )
    return check_alpha(module, float(tensor.reshape(()).item()), rank, parts.keys["alpha"])


def lycoris_to_kohya(
    tensors: Mapping[str, torch.Tensor], kohya_name: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    """Canonical LyCORIS tensors → kohya/LyCORIS keys; ``.alpha`` = rank where alpha applies (scale 1)."""
    modules, stray = group(tensors)
    if stray:
        raise AdapterInvalid(f"not a canonical key: {first(stray, 1)[0]}", reason="not_canonical")
    out: dict[str, torch.Tensor] = {}
    for module, factors in sorted(modules.items()):
        name = kohya_name(module)
        kinds = {ROLE_KIND[r] for r in factors}
        kind = kinds.pop()
        for role, tensor in factors.items():
            role, tensor = _kohya_role(role, tensor, factors)
            out[f"{name}.{role}"] = tensor
        rank, _ = check_module(kind, factors, None)
        if rank is not None and uses_alpha(kind, factors):
            out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    return out


def _kohya_role(
    role: str, tensor: torch.Tensor, factors: Mapping[str, torch.Tensor]
) -> tuple[str, torch.Tensor]:
    """A canonical DoRA role → the kohya/LyCORIS key suffix (other kinds keep LyCORIS's names). PEFT's
    per-row magnitude is written as a ``[out, 1(, 1, 1)]`` ``dora_scale``, the shape that names its axis:
    equal at weight 1; at other weights kohya tools apply their own (ComfyUI's) rule."""
    if role == "dora_magnitude":
        return "dora_scale", tensor.reshape(-1, *([1] * (factors["dora_down"].dim() - 1)))
    return {"dora_down": "lora_down.weight", "dora_up": "lora_up.weight"}.get(role, role), tensor
