"""Key layouts → the canonical layout, and back out to kohya.

Canonical layout: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` where ``<component>`` is
``unet``, ``text_encoder`` or (SDXL) ``text_encoder_2`` and ``<module>`` is the module's name in the
loaded diffusers/transformers model, i.e. exactly the keys of ``Architecture.modules``. alpha/rank is
folded into ``lora_B`` so the adapter applies at scale 1.0 (what diffusers assumes when a file has no alphas).

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
(``lora_te2_…`` on SD1.x) are refused as another family's adapter (``family_mismatch``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.kohya_ldm import UnsupportedUNet, is_ldm_name, kohya_unet_names
from adapters.metadata import AdapterMetadata, SourceFormat
from adapters.validate import (
    DTYPE_NAMES,
    check_alpha,
    check_dtypes,
    check_finite,
    check_modules_exist,
    check_pair_shapes,
    check_rank,
    dominant,
    first,
)
from basemodel.families import (
    FAMILIES,
    find_family,
    kohya_components,
    label_of,
    lora_components,
    owners_of,
)
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
REFUSED_MARKERS = {
    "lora_mid": "LoCon/Tucker (lora_mid)",
    "oft_": "OFT",
    "lora_embedding_": "embedding LoRA",
}
REFUSED_WHY: dict[str, str] = {}
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


@dataclass(frozen=True)
class NormaliseInfo:
    """What normalisation found: the source layout and the original ranks / alphas."""

    source_format: SourceFormat
    ranks: dict[str, int]
    alphas: dict[str, float]
    dtype: str
    kind: str = "lora"  # adapters.kinds.AdapterKind

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.ranks)

    def summary(self) -> dict[str, Any]:
        """The tensor-summary fields of ``AdapterMetadata`` (rank/alpha with PEFT-style patterns)."""
        rank, rank_pattern = dominant(self.ranks)
        alpha, alpha_pattern = dominant(self.alphas)
        return {
            "target_modules": self.target_modules,
            "rank": int(rank),
            "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
            "alpha": float(alpha),
            "alpha_pattern": {k: float(v) for k, v in alpha_pattern.items()},
            "dtype": self.dtype,
            **({"kind": self.kind} if self.kind != "lora" else {}),
        }

    def apply_to(self, metadata: AdapterMetadata) -> AdapterMetadata:
        return metadata.model_copy(update=self.summary())


@dataclass
class _Module:
    tensors: dict[Role, torch.Tensor] = field(default_factory=dict)
    keys: dict[Role, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _ParsedKey:
    layout: SourceFormat
    component: str | None  # None: a diffusers key without a component prefix
    name: str  # module path ('.'-separated) or, for kohya, the underscore-joined name
    role: Role


def normalise(
    tensors: Mapping[str, torch.Tensor],
    architecture: Architecture,
    *,
    max_rank: int | None = None,
    alpha: float | Mapping[str, float] | None = None,
    community: bool = True,
) -> tuple[dict[str, torch.Tensor], NormaliseInfo]:
    """Any accepted layout → canonical tensors with alpha/rank folded into ``lora_B``.

    ``alpha`` supplies alphas a layout does not carry (PEFT state dicts keep alpha in ``LoraConfig``):
    one number for all modules, or canonical module name → alpha. ``.alpha`` keys take precedence;
    modules with neither keep alpha = rank (scale 1.0). ``community``: first offer the file to the base
    family's own layouts (``ModelFamily.community_lora``: Flux's and SD3's kohya, XLabs, ai-toolkit).
    """
    if not tensors:
        raise AdapterInvalid("the adapter contains no tensors", reason="empty")
    check_dtypes(tensors)
    check_finite(tensors)
    from adapters import embedding, lycoris  # imports this module's helpers

    if embedding.is_embedding(tensors):
        return embedding.normalise_file(tensors, architecture)
    _refuse_unsupported(tensors)
    if community:
        found = _community(tensors, architecture)
        if found is not None:
            check_rank(found[1].ranks, max_rank)
            return found

    if lycoris.is_lycoris(tensors):
        return lycoris.normalise_lycoris(tensors, architecture, max_rank=max_rank, alpha=alpha)
    parsed = _parse_keys(tensors)
    layout = _layout_of(parsed)
    _check_components(parsed, architecture)
    modules = _group(tensors, parsed, architecture)
    pairs = {m: _pair(m, parts, architecture) for m, parts in modules.items()}
    ranks = check_pair_shapes(pairs, architecture)
    check_rank(ranks, max_rank)
    alphas = {m: _alpha_of(m, modules[m], ranks[m], alpha) for m in pairs}
    dtype = _common_dtype([t for pair in pairs.values() for t in pair])
    canonical: dict[str, torch.Tensor] = {}
    for module, (down, up) in sorted(pairs.items()):
        scale = alphas[module] / ranks[module]
        # Copies, never views: callers (the trainer) may keep updating the tensors they passed in.
        canonical[f"{module}.lora_A.weight"] = down.detach().to(dtype, copy=True).contiguous()
        folded = up.detach().to(torch.float32) * scale if scale != 1.0 else up.detach()
        canonical[f"{module}.lora_B.weight"] = folded.to(dtype, copy=True).contiguous()
    return canonical, NormaliseInfo(layout, ranks, alphas, DTYPE_NAMES[dtype])


def _community(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture
) -> tuple[dict[str, torch.Tensor], NormaliseInfo] | None:
    """The base family's reading of a file in a layout only its tools write (None: not one of those)."""
    from adapters.community import read_community  # reads its tables with this module's helpers

    family = find_family(architecture.family)
    found = family.community_lora(tensors, architecture) if family is not None else None
    return found if found is not None else read_community(tensors, architecture)


def _refuse_unsupported(tensors: Mapping[str, torch.Tensor]) -> None:
    for key in tensors:
        for marker, kind in REFUSED_MARKERS.items():
            if marker in key:
                why = REFUSED_WHY.get(kind)
                raise AdapterInvalid(
                    f"{kind} adapters are not supported (key {key}); LoRA / LoCon, LoHa, LoKr, DoRA and "
                    "full-weight diffs are" + (f": {why}" if why else ""),
                    reason="unsupported_adapter_type",
                    detail={"keys": [key]},
                )


def _parse_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, _ParsedKey]:
    parsed: dict[str, _ParsedKey] = {}
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


def _parse_key(key: str) -> _ParsedKey | None:
    match = KOHYA_KEY.match(key)
    if match is not None:
        owner = KOHYA_COMPONENTS[match["prefix"]]
        return _ParsedKey("kohya", owner, match["name"], KOHYA_ROLES[match["role"]])
    if key.startswith("lora_"):
        return None
    stem = key
    for prefix in PEFT_PREFIXES:
        stem = stem.removeprefix(prefix)
    component, path = _split_component(stem)
    for suffix, role, layout in DIFFUSERS_SUFFIXES:
        if path.endswith(suffix):
            return _ParsedKey(layout, component, path.removesuffix(suffix), role)
    match = PROCESSOR_KEY.match(path)
    if match is not None:
        names = PROCESSOR_NAMES["text_encoder" if component in TEXT_ENCODERS else "unet"]
        legacy_role: Role = "down" if match["role"] == "down" else "up"
        module = f"{match['prefix']}.{names[match['proj']]}"
        return _ParsedKey("diffusers-legacy", component, module, legacy_role)
    if path.endswith(".alpha"):
        return _ParsedKey("diffusers", component, path.removesuffix(".alpha"), "alpha")
    return None


def _split_component(stem: str) -> tuple[str | None, str]:
    for component in KEY_COMPONENTS:
        if stem.startswith(component + "."):
            return component, stem.removeprefix(component + ".")
    return None, stem


def _layout_of(parsed: Mapping[str, _ParsedKey]) -> SourceFormat:
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


def _group(
    tensors: Mapping[str, torch.Tensor], parsed: Mapping[str, _ParsedKey], architecture: Architecture
) -> dict[str, _Module]:
    kohya_table = _kohya_table(architecture, parsed.values())
    modules: dict[str, _Module] = {}
    absent: set[str] = set()
    for key, part in parsed.items():
        module = _resolve_module(part, architecture, kohya_table)
        if module is None:
            absent.add(_display_name(part))
            continue
        entry = modules.setdefault(module, _Module())
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


def _display_name(part: _ParsedKey) -> str:
    prefix = part.component or "?"
    return f"{prefix}.{part.name}"


def _is_ldm(part: _ParsedKey) -> bool:
    return part.layout == "kohya" and part.component == "unet" and is_ldm_name(part.name)


def _kohya_table(architecture: Architecture, parts: Iterable[_ParsedKey] = ()) -> dict[tuple[str, str], str]:
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


def _check_components(parsed: Mapping[str, _ParsedKey], architecture: Architecture) -> None:
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
    part: _ParsedKey, architecture: Architecture, kohya_table: Mapping[tuple[str, str], str]
) -> str | None:
    if part.layout == "kohya":
        return kohya_table.get((part.component or "", part.name))
    components = [part.component] if part.component else [*_denoisers(architecture), "text_encoder"]
    for component in components:
        for path in _path_variants(component, part.name):
            candidate = f"{component}.{path}"
            if candidate in architecture.modules:
                return candidate
    return None


def _denoisers(architecture: Architecture) -> list[str]:
    """The base's denoiser component (``unet`` or ``transformer``), for keys without a component."""
    present = {module.split(".", 1)[0] for module in architecture.modules}
    return [name for name in ("unet", "transformer") if name in present] or ["unet"]


def _path_variants(component: str, path: str) -> list[str]:
    if component not in TEXT_ENCODERS:
        return [path]
    return [path, path.removeprefix(TEXT_MODEL), TEXT_MODEL + path]


def _pair(module: str, parts: _Module, architecture: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    if "down" not in parts.tensors or "up" not in parts.tensors:
        missing = "lora_down/lora_A" if "down" not in parts.tensors else "lora_up/lora_B"
        raise AdapterInvalid(
            f"module {module} has no {missing} weight",
            reason="incomplete_pair",
            detail={"modules": [module], "keys": sorted(parts.keys.values())},
        )
    down, up = parts.tensors["down"], parts.tensors["up"]
    base = architecture.modules[module]
    if len(base) == 2 and down.dim() == 4 and down.shape[2:] == (1, 1) and up.dim() == 4:
        return down.flatten(1), up.flatten(1)  # 1x1-conv LoRA stored for a Linear
    if len(base) == 4 and base[2:] == (1, 1) and down.dim() == 2 and up.dim() == 2:
        return down[:, :, None, None], up[:, :, None, None]  # linear LoRA for a 1x1 conv
    return down, up


def _alpha_of(module: str, parts: _Module, rank: int, default: float | Mapping[str, float] | None) -> float:
    tensor = parts.tensors.get("alpha")
    if tensor is not None:
        if tensor.numel() != 1:
            raise AdapterInvalid(
                f"alpha for {module} has shape {list(tensor.shape)}; a scalar is expected",
                reason="bad_alpha",
                detail={"keys": [parts.keys["alpha"]]},
            )
        value = float(tensor.reshape(()).item())
    elif isinstance(default, Mapping):
        value = float(default.get(module, rank))
    elif default is not None:
        value = float(default)
    else:
        value = float(rank)
    return check_alpha(module, value, rank, parts.keys.get("alpha"))


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def to_kohya(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture | None = None
) -> dict[str, torch.Tensor]:
    """Canonical tensors → kohya/A1111 keys: ``adapters.kohya_export.to_kohya`` (kept here for callers)."""
    from adapters.kohya_export import to_kohya as export

    return export(tensors, architecture)
