"""Key layouts → the canonical layout, and back out to kohya.

Canonical layout: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` where ``<component>`` is
``unet``, ``text_encoder`` or (SDXL) ``text_encoder_2`` and ``<module>`` is the module's name in the
loaded diffusers/transformers model, i.e. exactly the keys of ``Architecture.modules``. alpha/rank is
folded into ``lora_B`` so the adapter applies at scale 1.0 (what diffusers assumes when a file has no alphas).

The accepted input layouts (diffusers/PEFT, diffusers-legacy, kohya with SD or LDM names) and how their
keys find the base model's modules are ``adapters.keys``; this module pairs the halves, checks shapes,
ranks and alphas, folds the scale and hands embeddings, LyCORIS files and the families' community
layouts to their readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapters.errors import AdapterInvalid
from adapters.keys import (
    KOHYA_COMPONENTS,
    TEXT_MODEL,
    ModuleParts,
    ParsedKey,
    Role,
    check_components,
    group_modules,
    kohya_table,
    layout_of,
    parse_keys,
    path_variants,
)
from adapters.metadata import AdapterMetadata, SourceFormat
from adapters.validate import (
    DTYPE_NAMES,
    check_alpha,
    check_dtypes,
    check_finite,
    check_pair_shapes,
    check_rank,
    dominant,
)
from basemodel.families import find_family
from basemodel.fingerprint import Architecture

# adapters.lycoris, adapters.community and adapters.kohya_export import these from here (their old
# names); new code imports adapters.keys
_ParsedKey = ParsedKey
_check_components = check_components
_kohya_table = kohya_table
_path_variants = path_variants
__all__ = ["KOHYA_COMPONENTS", "TEXT_MODEL", "NormaliseInfo", "Role", "normalise", "to_kohya"]

REFUSED_MARKERS = {
    "lora_mid": "LoCon/Tucker (lora_mid)",
    "oft_": "OFT",
    "lora_embedding_": "embedding LoRA",
}
REFUSED_WHY: dict[str, str] = {}


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
    parsed = parse_keys(tensors)
    layout = layout_of(parsed)
    check_components(parsed, architecture)
    modules = group_modules(tensors, parsed, architecture)
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


def _pair(module: str, parts: ModuleParts, architecture: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
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


def _alpha_of(
    module: str, parts: ModuleParts, rank: int, default: float | Mapping[str, float] | None
) -> float:
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
