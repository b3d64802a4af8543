"""Community LoRA files of the transformer families (Flux.1, SD3/SD3.5) → the canonical layout.

A family describes its layouts with a ``CommunityLayout`` (``basemodel/families/<family>/lora_keys.py``,
built from the transformer config); this module applies it. Accepted, per key:

* kohya sd-scripts / ComfyUI: ``lora_unet_<BFL or SGM path with _>``
  (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_joint_blocks_0_x_block_attn_qkv``) or ``lora_unet_<diffusers path with _>`` (also
  ``lora_transformer_<diffusers path with _>``, the "mixture" files diffusers reads), with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; text encoders under the family's prefixes
  (``lora_te1_`` …), named as for the UNet families;
* ai-toolkit / ComfyUI / SimpleTuner: ``diffusion_model.`` + BFL or diffusers paths with ``lora_A`` /
  ``lora_B`` (or ``lora_down`` / ``lora_up``) and ``.alpha``;
* XLabs: ``[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`` … (no alpha, scale 1.0);
* LyCORIS (LoHa, LoKr, full ``diff``/``diff_b``) under any of those names;
* PEFT DoRA magnitudes (``….lora_magnitude_vector``) beside PEFT halves: in the generic layout
  (``transformer.<diffusers path>…``) the file is ``adapters.lycoris``'s, a ``dora`` adapter.

Fused projections are split exactly: the targets of a LoRA share its down matrix (and alpha) and take
their rows of the up matrix; LoHa and full diffs split their row factors; a LoKr splits only where the
ranges fall on its Kronecker blocks (else ``unsplittable_adapter``). The rewritten tensors go through
``adapters.normalise`` like any diffusers file (shapes, alpha folding, rank limits); ``source_format`` says
which tool's layout it was (``kohya``, ``ai-toolkit``, ``xlabs``).

Refused, typed and naming the keys: the T5 encoder (``lora_te3_`` …: never adapted, as diffusers drops
them), norm diffs (``….norm….diff``: norm scales are not Linear weights; diffusers drops them), bias diffs
beside LoRA weights (``diff_b`` next to ``lora_down``; diffusers drops them), a key in no known layout,
and a module the base does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.kinds import LYCORIS_ROLES, MAX_DORA_GROUPS, ROLE_KIND, dora_axis
from adapters.metadata import SourceFormat
from adapters.normalise import (
    NormaliseInfo,
    _check_components,
    _kohya_table,
    _ParsedKey,
    _path_variants,
    normalise,
)
from adapters.validate import check_modules_exist, first
from basemodel.families import ModelFamily, find_family, label_of
from basemodel.families.lora_tables import CommunityLayout, Rows, Target
from basemodel.fingerprint import Architecture

PEFT_MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude: one per output row
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    *(
        (f".{PEFT_MAGNITUDE}{tail}", PEFT_MAGNITUDE)
        for tail in (".default.weight", ".default", ".weight", "")
    ),
    (".lora_down.weight", "lora_A.weight"),
    (".lora_up.weight", "lora_B.weight"),
    (".lora_A.default.weight", "lora_A.weight"),
    (".lora_B.default.weight", "lora_B.weight"),
    (".lora_A.weight", "lora_A.weight"),
    (".lora_B.weight", "lora_B.weight"),
    (".lora.down.weight", "lora_A.weight"),
    (".lora.up.weight", "lora_B.weight"),
    (".down.weight", "lora_A.weight"),  # XLabs
    (".up.weight", "lora_B.weight"),
    (".alpha", "alpha"),
    *((f".{role}", role) for role in LYCORIS_ROLES),
    # PEFT DoRA (``loraswap train --dora`` on SD3/Flux): a LoRA's halves plus a magnitude; a file in the
    # generic layout is left to ``adapters.lycoris``, which reads it as a ``dora`` adapter
    *(
        (f".lora_magnitude_vector{end}", "lora_magnitude_vector")
        for end in (".default.weight", ".weight", "")
    ),
)
DIFFUSION_MODEL = ("model.diffusion_model.", "diffusion_model.")
GENERIC_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder")
ROW_FACTORS = {
    "lora": ("lora_B.weight",),
    "loha": ("hada_w1_a", "hada_w2_a"),
    "full": ("diff", "diff_b"),
    "dora": ("lora_B.weight", PEFT_MAGNITUDE),  # and a per-row dora_scale (``_row_roles``)
}


@dataclass(frozen=True)
class _Source:
    """One module as the file names it: its targets, the tool that names it so, and its display name."""

    component: str
    targets: tuple[Target, ...]
    layout: SourceFormat
    name: str


@dataclass
class _Group:
    source: _Source
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def normalise_community(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture, layout: CommunityLayout
) -> tuple[dict[str, torch.Tensor], NormaliseInfo] | None:
    """A community file → canonical tensors and what normalisation found; None when every key is in the
    generic layouts (``<component>.<diffusers path>…``), which ``adapters.normalise`` reads itself."""
    _refuse(tensors, layout)
    _refuse_components(tensors, architecture)
    resolver = _Resolver(architecture, layout)
    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    absent: list[str] = []
    for key, tensor in tensors.items():
        parsed = _split_role(key)
        if parsed is None:
            unknown.append(key)
            continue
        stem, role = parsed
        source = resolver.resolve(stem)
        if source is None:
            absent.append(stem)
            continue
        group = groups.setdefault(f"{source.component}:{source.name}", _Group(source))
        if role in group.tensors:
            raise AdapterInvalid(
                f"keys {group.keys[role]} and {key} both give {role} for module {source.name}",
                reason="duplicate_key",
            )
        group.tensors[role] = tensor
        group.keys[role] = key
    _refuse_unknown(unknown, absent, architecture)
    layouts = {g.source.layout for g in groups.values()}
    if layouts <= {"diffusers"} and not any(_unprefixed_dora(g) for g in groups.values()):
        return None
    rewritten = _rewrite(groups)
    canonical, info = normalise(rewritten, architecture, community=False)
    formats: tuple[SourceFormat, ...] = ("xlabs", "kohya", "ai-toolkit")
    source_format: SourceFormat = next((f for f in formats if f in layouts), "diffusers")
    return canonical, NormaliseInfo(source_format, info.ranks, info.alphas, info.dtype, info.kind)


def _unprefixed_dora(group: _Group) -> bool:
    """A DoRA module under a diffusers path without its component (PEFT's own state dict:
    ``transformer_blocks.0.attn.to_q.lora_magnitude_vector``, optionally ``base_model.model.``-prefixed),
    which ``adapters.lycoris`` does not resolve: rewritten here under ``<component>.``."""
    dora = PEFT_MAGNITUDE in group.tensors or "dora_scale" in group.tensors
    return dora and not group.source.name.startswith(f"{group.source.component}.")


def _refuse(tensors: Mapping[str, torch.Tensor], layout: CommunityLayout) -> None:
    for prefix, why in layout.refused.items():
        keys = [k for k in tensors if k.startswith(prefix)]
        if keys:
            raise AdapterInvalid(
                f"{len(keys)} key(s) under {prefix} are refused: {why} (e.g. {first(keys, 1)[0]})",
                reason="unsupported_component",
                detail={"keys": first(keys), "count": len(keys)},
            )


def _refuse_components(tensors: Mapping[str, torch.Tensor], architecture: Architecture) -> None:
    """Keys of a component the base does not adapt (``text_encoder_2.`` on Flux: its T5; ``text_encoder_3.``
    on SD3) are refused as ``adapters.normalise`` refuses them (frozen encoder, or another family's)."""
    present = {module.split(".", 1)[0] for module in architecture.modules}
    foreign: dict[str, _ParsedKey] = {}
    for key in tensors:
        component = key.split(".", 1)[0]
        if component in (*GENERIC_COMPONENTS, "text_encoder_3", "unet") and component not in present:
            foreign[key] = _ParsedKey("diffusers", component, key.split(".", 1)[-1], "down")
    if foreign:
        _check_components(foreign, architecture)


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    return None


class _Resolver:
    """Module names as the file writes them → the components and diffusers modules they mean."""

    def __init__(self, architecture: Architecture, layout: CommunityLayout) -> None:
        self.architecture = architecture
        self.layout = layout
        self.component = layout.component
        self.kohya = {path.replace(".", "_"): targets for path, targets in layout.kohya.items()}
        own = f"{layout.component}."
        for module in architecture.modules:
            if module.startswith(own):
                path = module.removeprefix(own)
                self.kohya.setdefault(path.replace(".", "_"), (Target(path),))
        self.text = _kohya_table(architecture)

    def resolve(self, stem: str) -> _Source | None:
        stem = stem.removeprefix("base_model.model.")  # a PeftModel's own state dict
        for prefix in (self.layout.kohya_prefix, f"lora_{self.component}_"):  # sd-scripts; "mixture" files
            if stem.startswith(prefix):
                targets = self.kohya.get(stem.removeprefix(prefix))
                return _Source(self.component, targets, "kohya", stem) if targets else None
        for prefix, component in self.layout.text_prefixes.items():
            if stem.startswith(prefix):
                return self._text(stem, prefix, component)
        for prefix in DIFFUSION_MODEL:
            if stem.startswith(prefix):
                return self._dotted(stem.removeprefix(prefix), stem, "ai-toolkit")
        for component in GENERIC_COMPONENTS:
            if stem.startswith(component + "."):
                path = stem.removeprefix(component + ".")
                if component == self.component:
                    return self._dotted(path, stem, "diffusers")
                return self._generic(component, path, stem)
        return self._dotted(stem, stem, "diffusers")

    def _text(self, stem: str, prefix: str, component: str) -> _Source | None:
        name = stem.removeprefix(prefix)
        if prefix.endswith("_"):  # kohya: underscore names, looked up like the UNet families'
            module = self.text.get((component, name))
            return _Source(component, (Target(module.split(".", 1)[1]),), "kohya", stem) if module else None
        return self._generic(component, name, stem, "ai-toolkit")

    def _generic(
        self, component: str, path: str, stem: str, layout: SourceFormat = "diffusers"
    ) -> _Source | None:
        for variant in _path_variants(component, path):
            if f"{component}.{variant}" in self.architecture.modules:
                return _Source(component, (Target(variant),), layout, stem)
        return None

    def _dotted(self, path: str, stem: str, layout: SourceFormat) -> _Source | None:
        """A dotted path in the denoiser: the original model's (BFL/SGM, XLabs) or diffusers' own."""
        if path in self.layout.kohya:
            return _Source(self.component, self.layout.kohya[path], "ai-toolkit", stem)
        if path in self.layout.xlabs:
            return _Source(self.component, self.layout.xlabs[path], "xlabs", stem)
        if f"{self.component}.{path}" in self.architecture.modules:
            return _Source(self.component, (Target(path),), layout, stem)
        return None


def _refuse_unknown(unknown: list[str], absent: list[str], architecture: Architecture) -> None:
    if unknown:
        raise AdapterInvalid(
            f"unknown key layout: {len(unknown)} key(s) are not LoRA keys in a known layout, "
            f"e.g. {first(unknown, 1)[0]}",
            reason="unknown_layout",
            detail={"keys": first(unknown), "count": len(unknown)},
            hint="Accepted for this family: diffusers/PEFT, kohya (lora_unet_…), ai-toolkit/ComfyUI "
            "(diffusion_model.…), XLabs (…processor.qkv_lora1…) and LyCORIS. See docs/adapters.md.",
        )
    norms = [name for name in absent if "norm" in name.rsplit(".", 1)[-1] or "_norm" in name]
    if norms:
        raise AdapterIncompatible(
            f"{len(norms)} module(s) are norm layers, e.g. {first(norms, 1)[0]}: a norm's scale is no "
            "Linear weight and is not adapted (diffusers drops these keys too)",
            reason="unsupported_module",
            detail={"modules": first(norms), "count": len(norms)},
            hint="Re-export the adapter without its norm diffs.",
        )
    if absent:
        check_modules_exist(absent, architecture)


def _rewrite(groups: Mapping[str, _Group]) -> dict[str, torch.Tensor]:
    """Every source module's tensors → ``<component>.<target>.<role>`` (+ ``.alpha``) per target."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    fused = 0  # the next dora_group number
    for group in groups.values():
        kind = _kind_of(group)
        alpha = group.tensors.get("alpha")
        factors = {r: t for r, t in group.tensors.items() if r not in ("alpha", "dora_group")}
        _check_rows(group, kind, factors)
        if len(group.source.targets) > 1 and _dora_axis(kind, factors) == "in":
            factors["dora_group"] = _dora_group(fused, factors["lora_A.weight"], group.source.name)
            fused += 1
        for target in group.source.targets:
            module = f"{group.source.component}.{target.module}"
            if module in owner:
                raise AdapterInvalid(
                    f"{owner[module]} and {group.source.name} both adapt module {module}",
                    reason="duplicate_key",
                    detail={"modules": [module]},
                )
            owner[module] = group.source.name
            for role, tensor in _rows(kind, factors, target.rows, group.source.name).items():
                out[f"{module}.{role}"] = tensor
            if alpha is not None:
                out[f"{module}.alpha"] = alpha
    return out


def _dora_group(number: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """The ``dora_group`` of the parts of a fused module whose DoRA norm is per input column: its column
    norm spans every part's rows, so the parts are decomposed together at load (``adapters.delta``)."""
    if number >= MAX_DORA_GROUPS:
        raise AdapterInvalid(
            f"module {name} is the {number + 1}th fused module with a per-column DoRA magnitude; at most "
            f"{MAX_DORA_GROUPS} are supported",
            reason="bad_dora_group",
        )
    return torch.tensor(float(number), dtype=like.dtype)


def _kind_of(group: _Group) -> str:
    kinds = {_role_kind(r) for r in group.tensors if r != "alpha"}
    if kinds == {"lora", "dora"}:  # a LoRA's halves beside a DoRA magnitude
        kinds = {"dora"}
    if "lora" in kinds and "diff_b" in group.tensors:
        raise AdapterInvalid(
            f"module {group.source.name} has a bias diff (diff_b) beside its LoRA weights: a bias change is "
            "not part of a LoRA and is not applied (diffusers drops these keys too)",
            reason="unsupported_adapter_type",
            detail={"keys": sorted(group.keys.values())},
            hint="Re-export the adapter without its diff_b keys.",
        )
    if len(kinds) != 1:
        raise AdapterInvalid(
            f"module {group.source.name} mixes adapter kinds ({', '.join(sorted(kinds)) or 'none'})",
            reason="mixed_adapter_kinds" if kinds else "incomplete_pair",
            detail={"keys": sorted(group.keys.values())},
        )
    return kinds.pop()


def _role_kind(role: str) -> str:
    if role == PEFT_MAGNITUDE:
        return "dora"
    return "lora" if role.startswith("lora_") else ROLE_KIND[role]


def _row_roles(kind: str, factors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The factors whose rows are ΔW's rows: a DoRA's per-row ``dora_scale`` ``[out, 1]`` too (a
    per-column ``[1, in]`` one belongs to every row)."""
    return (*ROW_FACTORS[kind], "dora_scale") if _dora_axis(kind, factors) == "out" else ROW_FACTORS[kind]


def _dora_axis(kind: str, factors: Mapping[str, torch.Tensor]) -> str | None:
    """The axis of a kohya/LyCORIS DoRA's ``dora_scale`` on its (fused) source weight (None: none)."""
    scale, down, up = (factors.get(r) for r in ("dora_scale", "lora_A.weight", "lora_B.weight"))
    if kind != "dora" or scale is None or down is None or up is None or down.dim() < 2 or up.dim() < 1:
        return None
    return dora_axis(tuple(scale.shape), (int(up.shape[0]), *(int(d) for d in down.shape[1:])))


def _source_rows(kind: str, factors: Mapping[str, torch.Tensor]) -> int | None:
    """The number of rows of the source's ΔW as every factor that gets sliced says it (None: they
    disagree, or one is a scalar)."""
    if kind == "lokr":
        w1 = factors.get("lokr_w1", factors.get("lokr_w1_a"))
        block = _lokr_block(factors)
        if w1 is None or w1.dim() == 0 or not block:
            return None
        return int(w1.shape[0]) * block
    rows = _row_roles(kind, factors)
    counts = {int(t.shape[0]) if t.dim() else -1 for r, t in factors.items() if r in rows}
    return counts.pop() if len(counts) == 1 and -1 not in counts else None


def _check_rows(group: _Group, kind: str, factors: Mapping[str, torch.Tensor]) -> None:
    targets = group.source.targets
    if all(t.rows is None for t in targets):
        return
    want = max(end for t in targets for _, end in (t.rows or ()))
    scale = factors.get("dora_scale")
    if scale is not None and _dora_axis(kind, factors) is None:
        raise AdapterIncompatible(
            f"module {group.source.name} has a dora_scale {list(scale.shape)}, which fits neither [1, in] "
            f"(per input column) nor [{want}, 1] (per output row) of the fused weight its LoRA halves give",
            reason="shape_mismatch",
            detail={"modules": {group.source.name: f"dora_scale {list(scale.shape)}"}},
        )
    have = _source_rows(kind, factors)
    if have != want:
        parts = ", ".join(f"{t.module} {t.out_rows()}" for t in targets)
        found = "factors of inconsistent shapes" if have is None else f"{have} output rows"
        raise AdapterIncompatible(
            f"module {group.source.name} gives {found}; the base model's {len(targets)} module(s) it "
            f"maps onto ({parts}) take {want}",
            reason="shape_mismatch",
            detail={"modules": {group.source.name: f"{found}, expected {want} rows"}},
        )


def _lokr_block(factors: Mapping[str, torch.Tensor]) -> int | None:
    """Rows of LoKr's second factor (W2): ΔW = W1 ⊗ W2 is made of blocks of that many rows."""
    if "lokr_w2" in factors:
        w2 = factors["lokr_w2"]
        return int(w2.shape[0]) if w2.dim() else None
    if "lokr_w2_a" in factors:
        w2a = factors["lokr_w2_a"]
        axis = 1 if "lokr_t2" in factors else 0
        return int(w2a.shape[axis]) if w2a.dim() > axis else None
    return None


def _rows(
    kind: str, factors: Mapping[str, torch.Tensor], rows: Rows | None, name: str
) -> dict[str, torch.Tensor]:
    """The factors of the ΔW rows ``rows`` (concatenated) of a source module's ΔW."""
    if rows is None:
        return dict(factors)
    if kind == "lokr":
        return _lokr_rows(factors, rows, name)
    if kind == "loha" and "hada_t1" in factors:
        raise AdapterInvalid(
            f"module {name} is a Tucker LoHa (conv) and cannot be split into the base model's modules",
            reason="unsplittable_adapter",
        )
    out = dict(factors)
    for role in _row_roles(kind, factors):
        if role in factors:
            out[role] = torch.cat([factors[role][start:end] for start, end in rows]).contiguous()
    return out


def _lokr_rows(factors: Mapping[str, torch.Tensor], rows: Rows, name: str) -> dict[str, torch.Tensor]:
    """Rows of W1 ⊗ W2 are W1's rows ⊗ W2 when the ranges fall on W2's row blocks; else refused."""
    block = _lokr_block(factors)
    if block is None or any(start % block or end % block for start, end in rows):
        raise AdapterInvalid(
            f"LoKr module {name} cannot be split exactly: its Kronecker blocks of {block} rows do not fall "
            f"on the boundaries {[list(r) for r in rows]} of the base model's modules",
            reason="unsplittable_adapter",
            detail={"modules": [name]},
            hint="Train the LoKr on the diffusers modules (to_q, to_k, to_v), or merge it with its own "
            "tools.",
        )
    role = "lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"
    out = dict(factors)
    out[role] = torch.cat([factors[role][start // block : end // block] for start, end in rows]).contiguous()
    return out


def layout_of(architecture: Architecture) -> CommunityLayout | None:
    """The base family's community layout (``ModelFamily.lora_layout`` of the denoiser config); None for
    families without one (the UNet families: their kohya names are read by ``adapters.normalise``)."""
    family = find_family(architecture.family)
    if family is None or type(family).lora_layout is ModelFamily.lora_layout:
        return None
    config = architecture.unet_config
    if config is None:
        raise AdapterInvalid(
            f"community LoRA names of {label_of(architecture.family)} are mapped from the base model's "
            "transformer config, and this base model's descriptor has none",
            reason="unknown_layout",
            hint="Load the base model from a diffusers folder (its transformer/config.json), or use a "
            "diffusers/PEFT-layout LoRA.",
        )
    return family.lora_layout(config)


def read_community(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture
) -> tuple[dict[str, torch.Tensor], NormaliseInfo] | None:
    """``ModelFamily.community_lora`` for families with a ``lora_layout``: ``normalise_community``."""
    layout = layout_of(architecture)
    return None if layout is None else normalise_community(tensors, architecture, layout)
