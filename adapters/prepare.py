"""Input file → checked, canonical tensors + complete metadata (shared by register and convert).

Checks, in order: container and limits (``read_adapter``), the architecture the file declares,
key layout / modules / shapes / rank / values (``normalise``), then the exact base checkpoint:
``base_model_match`` is True when the file names this base's fingerprint (``loraswap.base_model``
or kohya's ``ss_new_sd_model_hash``), False when it names another, None when it names none.
Strict-base mode refuses anything but True.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapters.errors import AdapterIncompatible, AdapterTooLarge
from adapters.format import DEFAULT_LIMITS, Limits, read_adapter
from adapters.identity import BaseIdentity
from adapters.metadata import (
    MAX_METADATA_BYTES,
    AdapterMetadata,
    SourceFormat,
    check_scale,
    parse_header_metadata,
    training_from_kohya,
)
from adapters.normalise import NormaliseInfo, normalise
from adapters.records import AdapterVersion, tensor_digest
from adapters.validate import check_alpha
from basemodel.families import declared_by, label_of

REGISTRY_FIELDS = frozenset(
    {
        "schema_version",
        "adapter_id",
        "version",
        "created_at",
        "base_model",
        "base_model_match",
        "source_format",
        "kind",
        "target_modules",
        "rank",
        "alpha",
        "rank_pattern",
        "alpha_pattern",
        "dtype",
    }
)
VOLATILE_FIELDS = frozenset({"adapter_id", "version", "created_at"})


@dataclass(frozen=True)
class Prepared:
    """A validated adapter ready to be written: canonical tensors, metadata and content digest.

    ``digest`` covers the tensors and the metadata except id, version and created_at: two
    registrations with the same digest are the same content. ``layout`` and ``file_tensors`` describe
    the file as it is (its key layout and tensor count), whatever its metadata records as its origin.
    """

    tensors: dict[str, torch.Tensor]
    metadata: AdapterMetadata
    digest: str
    layout: SourceFormat
    file_tensors: int
    embedded: AdapterMetadata | None


def prepare(
    data: bytes,
    base: BaseIdentity,
    user: AdapterMetadata,
    *,
    max_rank: int | None,
    limits: Limits = DEFAULT_LIMITS,
    strict_base: bool = False,
    scale_default: float | None = None,
) -> Prepared:
    tensors, header = read_adapter(data, limits=limits)
    embedded = parse_header_metadata(header)
    check_declared_architecture(embedded, base, header)
    canonical, info = normalise(tensors, base.architecture, max_rank=max_rank)
    match = base_match(embedded, header, base)
    if strict_base and match is not True:
        raise AdapterIncompatible(
            "strict base mode: the adapter is not recorded against this exact base model"
            + (" (it names a different checkpoint)" if match is False else " (it names none)"),
            reason="base_mismatch" if match is False else "base_unknown",
            detail={"base_model": base.name, "fingerprint": base.fingerprint},
        )
    fields = user_fields(embedded, user, header)
    if scale_default is not None:
        fields["scale_default"] = check_scale(scale_default, field="scale_default")
    summary = tensor_summary(info, embedded)
    meta = AdapterMetadata(**fields, **summary, base_model=base.info(), base_model_match=match)
    check_metadata_size(meta)
    stable = meta.model_dump(mode="json", exclude=set(VOLATILE_FIELDS))
    digest = tensor_digest(canonical, json.dumps(stable, sort_keys=True).encode())
    return Prepared(canonical, meta, digest, info.source_format, len(tensors), embedded)


def check_metadata_size(meta: AdapterMetadata) -> None:
    """Refuse (413) user-owned metadata longer than ``MAX_METADATA_BYTES`` as JSON."""
    size = len(meta.model_dump_json(exclude=set(REGISTRY_FIELDS), exclude_none=True).encode())
    if size > MAX_METADATA_BYTES:
        raise AdapterTooLarge(
            f"the adapter metadata is {size} bytes as JSON, over the {MAX_METADATA_BYTES}-byte limit",
            reason="metadata_too_large",
            detail={"size": size, "limit": MAX_METADATA_BYTES},
            hint="Shorten the title, description or other metadata fields.",
        )


def check_declared_architecture(
    embedded: AdapterMetadata | None, base: BaseIdentity, header: Mapping[str, str] | None = None
) -> None:
    """The model family and architecture the file declares (our metadata, else modelspec/kohya keys)."""
    declared = embedded.base_model if embedded is not None else None
    named = declared_by(header or {}) if declared is None else None
    if named is not None and named[0].name != base.family:
        family, source = named
        raise AdapterIncompatible(
            f"the adapter is for {label_of(family.name)} base models ({source}); "
            f"{base.name!r} is {label_of(base.family)}",
            reason="family_mismatch",
            detail={"adapter_family": family.name, "base_family": base.family},
        )
    if declared is None or declared.architecture_id in (None, base.architecture_id):
        return
    raise AdapterIncompatible(
        f"the adapter was made for base model {declared.name!r} whose architecture "
        f"({label_of(declared.family)}) differs from {base.name!r} ({label_of(base.family)})",
        reason="architecture_mismatch",
        detail={
            "adapter_architecture_id": declared.architecture_id,
            "base_architecture_id": base.architecture_id,
            "adapter_family": declared.family,
            "base_family": base.family,
        },
    )


def check_open_compatible(version: AdapterVersion, base: BaseIdentity, strict: bool) -> None:
    """Opening a stored version for ``base``: same architecture always, same checkpoint if strict."""
    recorded = version.base_model
    if recorded.architecture_id not in (None, base.architecture_id):
        raise AdapterIncompatible(
            f"{version.ref} was registered for base model {recorded.name!r} ({label_of(recorded.family)}), "
            f"whose architecture differs from {base.name!r} ({label_of(base.family)})",
            reason="architecture_mismatch",
            detail={"adapter_family": recorded.family, "base_family": base.family},
        )
    if strict and version.base_model.fingerprint != base.fingerprint:
        raise AdapterIncompatible(
            f"strict base mode: {version.ref} was registered against another base checkpoint",
            reason="base_mismatch",
        )


def base_match(embedded: AdapterMetadata | None, header: dict[str, str], base: BaseIdentity) -> bool | None:
    """Whether the file names this exact base checkpoint: True / False / None (it names none)."""
    declared = embedded.base_model.fingerprint if embedded and embedded.base_model else None
    declared = declared or header.get("ss_new_sd_model_hash") or None
    if declared is None or declared == "None":
        return None
    return declared.lower() == base.fingerprint.lower()


def user_fields(
    embedded: AdapterMetadata | None, user: AdapterMetadata, header: dict[str, str]
) -> dict[str, Any]:
    """User-owned metadata: what the file carries, overridden field by field by the caller's."""
    fields: dict[str, Any] = {}
    if embedded is not None:
        fields.update(embedded.model_dump(exclude_none=True, exclude=set(REGISTRY_FIELDS)))
    else:
        training = training_from_kohya(header)
        if training is not None:
            fields["training"] = training.model_dump(exclude_none=True)
        title = header.get("modelspec.title") or header.get("ss_output_name")
        if title and title != "None":
            fields["title"] = title
    fields.update(user.model_dump(include=set(user.model_fields_set - REGISTRY_FIELDS)))
    return fields


def tensor_summary(info: NormaliseInfo, embedded: AdapterMetadata | None) -> dict[str, Any]:
    """rank/alpha/modules/dtype/source_format; an already-normalised file keeps its recorded alpha."""
    summary = info.summary()
    if embedded is None:
        summary["source_format"] = info.source_format
        return summary
    summary["source_format"] = embedded.source_format or "loraswap"
    if embedded.alpha is not None and info.source_format in ("diffusers", "diffusers-legacy"):
        pattern = {k: v for k, v in embedded.alpha_pattern.items() if k in info.ranks}
        for module, rank in info.ranks.items():  # recorded only, but bounded like an alpha we fold
            check_alpha(module, pattern.get(module, embedded.alpha), rank)
        summary["alpha"] = embedded.alpha
        summary["alpha_pattern"] = pattern
    return summary
