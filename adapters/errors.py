"""Adapter errors: specific ``type`` strings on top of the shared ``basemodel.errors`` hierarchy.

The base classes are kept so the HTTP layer maps them without knowing this package:
``ValidationFailed`` → 422, ``Incompatible`` → 409, ``NotFound`` → 404, ``TooLarge`` → 413.
Every error carries ``detail["reason"]``, a stable sub-code (``shape_mismatch``, ``rank_too_large`` …).
"""

from __future__ import annotations

from typing import Any

from basemodel.errors import (
    ConfigError,
    Incompatible,
    LoraswapError,
    NotFound,
    TooLarge,
    UnsafeFormat,
    ValidationFailed,
)

__all__ = [
    "AdapterCorrupt",
    "AdapterIncompatible",
    "AdapterInvalid",
    "AdapterNotFound",
    "AdapterNotSafetensors",
    "AdapterTooLarge",
    "AdapterUnsafeFormat",
    "InvalidAdapterRef",
    "StoreConfigError",
    "StoreError",
]


class _Reasoned(LoraswapError):
    """Mixin behaviour: a ``reason`` keyword lands in ``detail['reason']``."""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        merged = dict(detail or {})
        if reason is not None:
            merged["reason"] = reason
        super().__init__(message, detail=merged, hint=hint)

    @property
    def reason(self) -> str | None:
        value = self.detail.get("reason")
        return str(value) if value is not None else None


class AdapterInvalid(_Reasoned, ValidationFailed):
    """The file is not a valid LoRA adapter (malformed header, unknown keys, bad values …)."""

    type = "adapter_invalid"
    hint = "Check the file: a LoRA .safetensors in diffusers/PEFT or kohya layout is expected."


class AdapterNotSafetensors(AdapterInvalid):
    """The bytes are not a safetensors file at all (an HTML page, an image, an archive, empty …).

    ``detail.looks_like`` names what they look like (``adapters.sniff``); decided from the first bytes,
    before any size check.
    """

    type = "adapter_not_safetensors"
    hint = (
        "Send the .safetensors file itself: check the download (an HTML page is what a failed or "
        "login-walled download saves), or convert the checkpoint to safetensors."
    )


class AdapterUnsafeFormat(_Reasoned, UnsafeFormat):
    """A pickle checkpoint or another container we refuse to open."""

    type = "adapter_unsafe_format"


class InvalidAdapterRef(_Reasoned, ValidationFailed):
    """An adapter id or reference (``id``, ``id@latest``, ``id@3``) that is not well-formed."""

    type = "adapter_ref_invalid"
    hint = "Ids match ^[a-z0-9][a-z0-9._-]{0,63}$; references are ID, ID@latest or ID@<version>."


class AdapterIncompatible(_Reasoned, Incompatible):
    """The adapter does not fit the base model (architecture, modules, shapes, strict base)."""

    type = "adapter_incompatible"
    hint = "Use an adapter trained for this base model's architecture."


class AdapterNotFound(_Reasoned, NotFound):
    type = "adapter_not_found"
    hint = "List adapters with 'loraswap adapters list' (deleted versions cannot be resolved)."


class AdapterTooLarge(_Reasoned, TooLarge):
    type = "adapter_too_large"
    hint = "Send a smaller adapter or raise LORASWAP_MAX_ADAPTER_BYTES / LORASWAP_MAX_ADAPTER_HEADER_BYTES."


class AdapterCorrupt(_Reasoned):
    """Stored data failed its integrity check (sha256 mismatch, unreadable record)."""

    type = "adapter_corrupt"
    hint = "The store was modified outside loraswap; re-register the adapter."


class StoreError(_Reasoned):
    """The store backend failed (I/O error, S3 error other than a missing key)."""

    type = "adapter_store_error"
    hint = "Check the store URI, permissions and (for S3) credentials and endpoint."


class StoreConfigError(_Reasoned, ConfigError):
    """A store URI that cannot work (relative file:// path, s3:// without bucket …)."""

    type = "adapter_store_config"
