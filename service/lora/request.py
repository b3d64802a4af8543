"""What a request asks for, what it resolved to, and A1111's ``<lora:name:weight>`` prompt syntax."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.records import AdapterVersion
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


def extract_prompt_adapters(prompt: str) -> tuple[str, list[AdapterRequest]]:
    """Strip ``<lora:…>`` tags from ``prompt`` and return them as adapter requests."""
    found: list[AdapterRequest] = []
    for match in PROMPT_TAG.finditer(prompt):
        name, _, version = match["name"].strip().partition("@")
        weight = (match["weight"] or "").strip()
        try:
            scale = float(weight) if weight else None
            number = int(version) if version and version != "latest" else None
        except ValueError:
            raise ValidationFailed(
                f"bad prompt tag {match.group(0)!r}",
                detail={"field": "prompt"},
                hint="Write <lora:ID:WEIGHT> or <lora:ID@VERSION:WEIGHT>.",
            ) from None
        found.append(AdapterRequest(name.lower(), number, scale))
    if not found:
        return prompt, []
    return " ".join(PROMPT_TAG.sub(" ", prompt).split()), found
