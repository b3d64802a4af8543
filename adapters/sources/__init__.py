"""Adapter stores: one ``Store`` protocol, a filesystem and an S3 backend, chosen by URI.

``open_store("file:///abs/dir" | "/abs/or/relative/dir" | "s3://bucket/prefix")``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from adapters.errors import StoreConfigError
from adapters.identity import BaseIdentity
from adapters.sources.base import KeyMissing, Store
from adapters.sources.local import LocalStore

__all__ = ["BaseIdentity", "KeyMissing", "LocalStore", "Store", "open_store"]


def open_store(uri: str | Path, *, s3_endpoint_url: str | None = None) -> Store:
    """The store for ``uri``; a plain path is a local store (created on first write)."""
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

        return S3Store(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url)
    raise StoreConfigError(
        f"unsupported store URI scheme {parsed.scheme!r}; use file:// , a path or s3://", reason="bad_uri"
    )
