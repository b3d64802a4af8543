"""Adapter stores: one ``Store`` protocol, a filesystem and an S3 backend, chosen by URI.

``open_store("file:///abs/dir" | "/abs/or/relative/dir" | "s3://bucket/prefix")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from adapters.errors import StoreConfigError
from adapters.identity import BaseIdentity
from adapters.sources.base import KeyMissing, Store, StoreTimeouts
from adapters.sources.local import LocalStore

if TYPE_CHECKING:
    from basemodel.settings import Settings

__all__ = [
    "BaseIdentity",
    "KeyMissing",
    "LocalStore",
    "Store",
    "StoreTimeouts",
    "open_settings_store",
    "open_store",
    "store_timeouts",
]


def store_timeouts(settings: Settings) -> StoreTimeouts:
    """The bounds of remote store calls in the settings (``LORASWAP_STORE_*_TIMEOUT_S``, ``…_ATTEMPTS``)."""
    return StoreTimeouts(
        connect_s=settings.store_connect_timeout_s,
        read_s=settings.store_read_timeout_s,
        attempts=settings.store_max_attempts,
    )


def open_settings_store(settings: Settings) -> Store:
    """The adapter store the settings name, with their timeouts."""
    timeouts = store_timeouts(settings)
    return open_store(settings.adapter_store_uri, s3_endpoint_url=settings.s3_endpoint_url, timeouts=timeouts)


def open_store(
    uri: str | Path, *, s3_endpoint_url: str | None = None, timeouts: StoreTimeouts | None = None
) -> Store:
    """The store for ``uri``; a plain path is a local store (created on first write).

    ``timeouts`` bound every call of a remote store (default: ``StoreTimeouts()``, the settings' defaults).
    """
    if isinstance(uri, Path):
        return LocalStore(uri)
    text = uri.strip()
    if not text:
        raise StoreConfigError("empty store URI", reason="bad_uri")
    if "://" not in text:
        return LocalStore(Path(text))
    parsed = urlparse(text)
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or not path.startswith("/"):
            raise StoreConfigError(
                f"file store URIs must be absolute, like file:///abs/dir (got {uri!r})", reason="bad_uri"
            )
        return LocalStore(Path(path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreConfigError(
                f"S3 store URIs need a bucket: s3://bucket/prefix (got {uri!r})", reason="bad_uri"
            )
        from adapters.sources.s3 import S3Store

        return S3Store(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url, timeouts=timeouts)
    raise StoreConfigError(
        f"unsupported store URI scheme {parsed.scheme!r}; use file:// , a path or s3://", reason="bad_uri"
    )
