"""Adapter ids and references: ``id``, ``id@latest``, ``id@<version>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidAdapterRef

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_VERSION = 10**9


def validate_id(adapter_id: str) -> str:
    """Return ``adapter_id`` if it is a valid id (safe as one path segment / object-key segment)."""
    if not isinstance(adapter_id, str) or ID_PATTERN.fullmatch(adapter_id) is None or ".." in adapter_id:
        raise InvalidAdapterRef(
            f"invalid adapter id {adapter_id!r}",
            reason="bad_id",
            detail={"pattern": ID_PATTERN.pattern},
        )
    return adapter_id


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference. ``version`` is None for ``id`` and ``id@latest``; ``explicit`` tells them apart."""

    adapter_id: str
    version: int | None
    explicit: bool

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.adapter_id}@{self.version}"
        return f"{self.adapter_id}@latest" if self.explicit else self.adapter_id


def parse_ref(ref: str) -> AdapterRef:
    adapter_id, sep, selector = ref.partition("@")
    validate_id(adapter_id)
    if not sep:
        return AdapterRef(adapter_id, None, explicit=False)
    if selector == "latest":
        return AdapterRef(adapter_id, None, explicit=True)
    if not selector.isascii() or not selector.isdigit() or selector.startswith("0") or len(selector) > 9:
        raise InvalidAdapterRef(
            f"invalid adapter reference {ref!r}: the version must be 'latest' or a positive integer",
            reason="bad_ref",
        )
    return AdapterRef(adapter_id, int(selector), explicit=True)
