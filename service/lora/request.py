"""What a request asks for, what it resolved to, and A1111's ``<lora:name:weight>`` prompt syntax."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidAdapterRef
from adapters.metadata import check_scale
from adapters.records import AdapterVersion
from adapters.refs import MAX_VERSION, parse_ref, validate_id
from basemodel.errors import ValidationFailed
from service.lora.weights import DeviceAdapter

# <lora:id:0.8>, <lora:id@3:0.8>, <lora:id> (A1111 / ComfyUI prompt syntax)
PROMPT_TAG = re.compile(r"<lora:(?P<name>[^:>]+)(?::(?P<weight>[^>]*))?>", re.IGNORECASE)


@dataclass(frozen=True)
class AdapterRequest:
    adapter_id: str
    version: int | None = None
    scale: float | None = None

    @property
    def ref(self) -> str:
        return f"{self.adapter_id}@{self.version}" if self.version is not None else self.adapter_id


@dataclass(frozen=True)
class AppliedAdapter:
    """An adapter resolved to an immutable version, ready on the device, with its final scale."""

    version: AdapterVersion
    adapter: DeviceAdapter
    scale: float
    stale: bool = False  # a remembered 'latest' served while the store could not confirm it

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "id": self.version.adapter_id,
            "version": self.version.version,
            "sha256": self.version.sha256,
            "scale": self.scale,
        }
        if self.stale:
            described["stale"] = True
        return described


def adapter_request(
    adapter_id: str, version: int | None, scale: float | None, *, field: str
) -> AdapterRequest:
    """The one validation of an adapter named by a request: JSON ``adapters``, prompt tags, preload.

    Id as ``adapters.refs.validate_id``, version 1..``MAX_VERSION``, scale as ``check_scale`` (finite,
    −4..4); anything else → 422 naming ``field``.
    """
    try:
        validate_id(adapter_id)
    except InvalidAdapterRef as exc:
        exc.detail["field"] = field
        raise
    if version is not None and (isinstance(version, bool) or not 1 <= version <= MAX_VERSION):
        raise InvalidAdapterRef(
            f"{field}: version must be from 1 to {MAX_VERSION}, got {version!r}",
            reason="bad_ref",
            detail={"field": field},
        )
    return AdapterRequest(
        adapter_id,
        version,
        None if scale is None else check_scale(scale, field=field, what=f"the weight of {adapter_id!r}"),
    )


def extract_prompt_adapters(prompt: str) -> tuple[str, list[AdapterRequest]]:
    """Strip ``<lora:…>`` tags from ``prompt`` and return them as adapter requests (``adapter_request``)."""
    found: list[AdapterRequest] = []
    for match in PROMPT_TAG.finditer(prompt):
        tag = match.group(0)
        weight = (match["weight"] or "").strip()
        try:
            ref = parse_ref(match["name"].strip().lower())
            scale = float(weight) if weight else None
        except (ValueError, InvalidAdapterRef):
            raise ValidationFailed(
                f"bad prompt tag {tag!r}",
                detail={"field": "prompt"},
                hint="Write <lora:ID:WEIGHT> or <lora:ID@VERSION:WEIGHT>.",
            ) from None
        try:
            found.append(adapter_request(ref.adapter_id, ref.version, scale, field="prompt"))
        except ValidationFailed as exc:
            raise ValidationFailed(
                f"prompt tag {tag!r}: {exc.message}", detail=exc.detail, hint=exc.hint
            ) from None
    if not found:
        return prompt, []
    return " ".join(PROMPT_TAG.sub(" ", prompt).split()), found
