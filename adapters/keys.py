"""Key grammar of LoRA files: which layout each key is in and which base-model module it names.

Accepted input layouts (detected per key, one family per file):

* ``diffusers``: PEFT keys ``<component>.<module>.lora_A[.default].weight`` / ``lora_B``, with or without
  the component prefix (then matched against the base model), optional ``<module>.alpha``;
* ``diffusers-legacy``: ``….lora.down.weight`` / ``lora.up.weight``, ``….lora_linear_layer.down/up``,
  attention-processor keys ``…attn1.processor.to_q_lora.down.weight``;
* ``kohya`` (A1111, LoCon): ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``, ``lora_te_…`` / ``lora_te1_…`` for the text encoder and ``lora_te2_…`` for SDXL's second
  one (the prefixes the families declare, ``basemodel.families.kohya_components``). Names are mapped
  back by looking them up in a table built from the base architecture (``path.replace('.', '_')``),
  never by guessing underscores. LDM/SGM-style UNet names (``lora_unet_input_blocks_…``, what kohya
  writes for SDXL) are looked up in the table ``adapters.kohya_ldm`` derives from the base UNet's config.

Text encoders from recent transformers have no ``text_model.`` level; names with and without it are
both accepted and mapped onto whichever the base model has. Keys for a component the base lacks
(``lora_te2_…`` on SD1.x) are refused as another family's adapter (``family_mismatch``), keys for a text
encoder the family never adapts (T5) as ``unsupported_component``.

``adapters.normalise`` turns the grouped modules into canonical tensors; ``adapters.lycoris`` and
``adapters.community`` read their own layouts with the same tables (``kohya_table``, ``path_variants``,
``check_components``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.kohya_ldm import UnsupportedUNet, is_ldm_name, kohya_unet_names
from adapters.metadata import SourceFormat
from adapters.validate import check_modules_exist, first
from basemodel.families import FAMILIES, find_family, kohya_components, label_of, lora_components, owners_of
from basemodel.fingerprint import Architecture

Role = Literal["down", "up", "alpha"]

# kohya prefix → component, over every family (lora_unet_, lora_te_, lora_te1_, lora_te2_)
KOHYA_COMPONENTS = kohya_components()
KOHYA_KEY = re.compile(
    rf"^(?P<prefix>{'|'.join(sorted(map(re.escape, KOHYA_COMPONENTS), key=len, reverse=True))})"
    r"(?P<name>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$"
)
KOHYA_ROLES: dict[str, Role] = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_SUFFIXES: tuple[tuple[str, Role, SourceFormat], ...] = (
    (".lora_A.default.weight", "down", "diffusers"),
    (".lora_B.default.weight", "up", "diffusers"),
    (".lora_A.weight", "down", "diffusers"),
    (".lora_B.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers-legacy"),
    (".lora_linear_layer.up.weight", "up", "diffusers-legacy"),
    (".lora.down.weight", "down", "diffusers-legacy"),
    (".lora.up.weight", "up", "diffusers-legacy"),
)
PROCESSOR_KEY = re.compile(
    r"^(?P<prefix>.*?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
PEFT_PREFIXES = ("base_model.model.",)
# component prefixes a diffusers key may start with: every family's LoRA components and the text
# encoders no LoRA may target (T5: ``text_encoder_3`` on SD3), longest first (``text_encoder_2`` before
# ``text_encoder``)
KEY_COMPONENTS = tuple(
    sorted(
        {*lora_components(), *(n for f in FAMILIES for n in f.frozen_text_encoders)}, key=len, reverse=True
    )
)
TEXT_MODEL = "text_model."


@dataclass
class ModuleParts:
    """One base module's tensors from the file by role (``down``, ``up``, ``alpha``) and their keys."""

    tensors: dict[Role, torch.Tensor] = field(default_factory=dict)
    keys: dict[Role, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedKey:
    """What one key says: its layout, component, module name and role."""

    layout: SourceFormat
    component: str | None  # None: a diffusers key without a component prefix
    name: str  # module path ('.'-separated) or, for kohya, the underscore-joined name
    role: Role


def parse_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, ParsedKey]:
    """Every key parsed; any key in no known layout is ``unknown_layout``."""
    parsed: dict[str, ParsedKey] = {}
    unknown: list[str] = []
    for key in tensors:
        result = _parse_key(key)
        if result is None:
            unknown.append(key)
        else:
            parsed[key] = result
    if unknown:
        shown = first(unknown)
        raise AdapterInvalid(
            f"unknown key layout: {len(unknown)} key(s) are not LoRA keys in a known layout, e.g. {shown[0]}",
            reason="unknown_layout",
            detail={"keys": shown, "count": len(unknown)},
            hint="Accepted: diffusers/PEFT (lora_A/lora_B, lora.down/lora.up) and kohya "
            "(lora_unet_*/lora_te_* with lora_down/lora_up/alpha). See docs/adapters.md.",
        )
    return parsed


def _parse_key(key: str) -> ParsedKey | None:
    match = KOHYA_KEY.match(key)
    if match is not None:
        owner = KOHYA_COMPONENTS[match["prefix"]]
        return ParsedKey("kohya", owner, match["name"], KOHYA_ROLES[match["role"]])
    if key.startswith("lora_"):
        return None
    stem = key
    for prefix in PEFT_PREFIXES:
        stem = stem.removeprefix(prefix)
    component, path = _split_component(stem)
    for suffix, role, layout in DIFFUSERS_SUFFIXES:
        if path.endswith(suffix):
            return ParsedKey(layout, component, path.removesuffix(suffix), role)
    match = PROCESSOR_KEY.match(path)
    if match is not None:
        names = PROCESSOR_NAMES["text_encoder" if component in TEXT_ENCODERS else "unet"]
        legacy_role: Role = "down" if match["role"] == "down" else "up"
        module = f"{match['prefix']}.{names[match['proj']]}"
        return ParsedKey("diffusers-legacy", component, module, legacy_role)
    if path.endswith(".alpha"):
        return ParsedKey("diffusers", component, path.removesuffix(".alpha"), "alpha")
    return None


def _split_component(stem: str) -> tuple[str | None, str]:
    for component in KEY_COMPONENTS:
        if stem.startswith(component + "."):
            return component, stem.removeprefix(component + ".")
    return None, stem


def layout_of(parsed: Mapping[str, ParsedKey]) -> SourceFormat:
    """The file's one layout (kohya mixed with diffusers keys is refused)."""
    layouts = {p.layout for p in parsed.values() if p.role != "alpha"}
    if "kohya" in layouts and len(layouts) > 1:
        raise AdapterInvalid(
            "unknown key layout: kohya and diffusers keys are mixed in one file",
            reason="unknown_layout",
        )
    if not layouts:
        raise AdapterInvalid("the file has alpha values but no LoRA weights", reason="incomplete_pair")
    if "kohya" in layouts:
        return "kohya"
    return "diffusers-legacy" if "diffusers-legacy" in layouts else "diffusers"


def group_modules(
    tensors: Mapping[str, torch.Tensor], parsed: Mapping[str, ParsedKey], architecture: Architecture
) -> dict[str, ModuleParts]:
    """The tensors by canonical module; a name the base lacks is refused (``check_modules_exist``)."""
    table = kohya_table(architecture, parsed.values())
    modules: dict[str, ModuleParts] = {}
    absent: set[str] = set()
    for key, part in parsed.items():
        module = _resolve_module(part, architecture, table)
        if module is None:
            absent.add(_display_name(part))
            continue
        entry = modules.setdefault(module, ModuleParts())
        if part.role in entry.tensors:
            raise AdapterInvalid(
                f"keys {entry.keys[part.role]} and {key} both give {part.role} for module {module}",
                reason="duplicate_key",
            )
        entry.tensors[part.role] = tensors[key]
        entry.keys[part.role] = key
    if absent:
        check_modules_exist(absent, architecture)
    return modules


def _display_name(part: ParsedKey) -> str:
    prefix = part.component or "?"
    return f"{prefix}.{part.name}"


def _is_ldm(part: ParsedKey) -> bool:
    return part.layout == "kohya" and part.component == "unet" and is_ldm_name(part.name)


def kohya_table(architecture: Architecture, parts: Iterable[ParsedKey] = ()) -> dict[tuple[str, str], str]:
    """(component, underscore name) → canonical module, including the ``text_model_`` variants.

    When ``parts`` has LDM/SGM UNet names, the UNet's LDM names (``kohya_ldm``) are added too.
    """
    table: dict[tuple[str, str], str] = {}
    for module in architecture.modules:
        component, path = module.split(".", 1)
        table[(component, path.replace(".", "_"))] = module
        if component in TEXT_ENCODERS:
            alias = path.removeprefix(TEXT_MODEL) if path.startswith(TEXT_MODEL) else TEXT_MODEL + path
            table.setdefault((component, alias.replace(".", "_")), module)
    if any(_is_ldm(part) for part in parts):
        for name, path in _ldm_names(architecture).items():
            if f"unet.{path}" in architecture.modules:
                table[("unet", name)] = f"unet.{path}"
    return table


def _ldm_names(architecture: Architecture) -> dict[str, str]:
    """The base UNet's kohya LDM names → diffusers paths; refused when its config is unknown or odd."""
    hint = "Re-save the LoRA with diffusers-style names (lora_unet_down_blocks_…), or use a base model "
    if architecture.unet_config is None:
        raise AdapterInvalid(
            "unknown key layout: LDM-style kohya names (lora_unet_input_blocks_…) need the base UNet's "
            "config to be mapped, and this base model's descriptor has none",
            reason="unknown_layout",
            hint=hint + "loaded from a diffusers folder or a single-file checkpoint.",
        )
    try:
        return kohya_unet_names(architecture.unet_config)
    except UnsupportedUNet as exc:
        raise AdapterInvalid(
            f"unknown key layout: LDM-style kohya names cannot be mapped onto this base UNet: {exc}",
            reason="unknown_layout",
            hint=hint + "with a standard SD1/SD2/SDXL UNet.",
        ) from None


def check_components(parsed: Mapping[str, ParsedKey], architecture: Architecture) -> None:
    """Keys for a component the base lacks (``lora_te2_`` / ``text_encoder_2.`` on a one-encoder base)
    mean an adapter of another family: refused naming the families that have it and the base's."""
    present = {module.split(".", 1)[0] for module in architecture.modules}
    stray = sorted(k for k, part in parsed.items() if part.component not in (None, *present))
    if not stray:
        return
    component = parsed[stray[0]].component or ""
    _refuse_frozen(component, stray, architecture)
    owners = owners_of(component)
    if parsed[stray[0]].layout == "kohya":  # a kohya prefix: the families whose sd-scripts write it
        owners = [f for f in owners if component in f.kohya_prefixes.values()] or owners
    adapter = " or ".join(label_of(f.name) for f in owners) or "another model family"
    raise AdapterIncompatible(
        f"the adapter is for {adapter} base models: it has {len(stray)} key(s) for {component}, e.g. "
        f"{stray[0]}; the base model is {label_of(architecture.family)}, which has no {component}",
        reason="family_mismatch",
        detail={
            "modules": first({_display_name(parsed[k]) for k in stray}),
            "count": len(stray),
            "adapter_family": owners[0].name if owners else None,
            "base_family": architecture.family,
            "architecture_id": architecture.architecture_id,
        },
        hint="Use an adapter trained for this base model's family, or serve a base model of the adapter's.",
    )


def _refuse_frozen(component: str, keys: list[str], architecture: Architecture) -> None:
    """Keys for a text encoder the base family runs but never adapts (T5 on SD3/Flux): refused as such
    (diffusers' SD3/Flux loaders drop them too), not as another family's adapter."""
    family = find_family(architecture.family)
    what = family.frozen_text_encoders.get(component) if family is not None else None
    if family is None or what is None:
        return
    raise AdapterInvalid(
        f"the adapter has {len(keys)} key(s) for {component}, {family.label}'s {what} text encoder, e.g. "
        f"{keys[0]}; LoRAs on the {what} encoder are not supported (diffusers' {family.label} loader "
        f"drops them too): only {', '.join(sorted({m.split('.', 1)[0] for m in architecture.modules}))} "
        "may be adapted",
        reason="unsupported_component",
        detail={"component": component, "keys": first(keys), "count": len(keys), "family": family.name},
        hint=f"Remove the {component}.* keys (or train the LoRA without the {what} encoder).",
    )


def _resolve_module(
    part: ParsedKey, architecture: Architecture, kohya_table: Mapping[tuple[str, str], str]
) -> str | None:
    if part.layout == "kohya":
        return kohya_table.get((part.component or "", part.name))
    components = [part.component] if part.component else [*_denoisers(architecture), "text_encoder"]
    for component in components:
        for path in path_variants(component, part.name):
            candidate = f"{component}.{path}"
            if candidate in architecture.modules:
                return candidate
    return None


def _denoisers(architecture: Architecture) -> list[str]:
    """The base's denoiser component (``unet`` or ``transformer``), for keys without a component."""
    present = {module.split(".", 1)[0] for module in architecture.modules}
    return [name for name in ("unet", "transformer") if name in present] or ["unet"]


def path_variants(component: str, path: str) -> list[str]:
    """A text-encoder path with and without transformers' ``text_model.`` level (others: as is)."""
    if component not in TEXT_ENCODERS:
        return [path]
    return [path, path.removeprefix(TEXT_MODEL), TEXT_MODEL + path]
