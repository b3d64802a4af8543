"""The ``Store`` protocol: a flat key → bytes namespace with an atomic create-if-absent.

Keys are ``/``-separated relative paths whose segments match ``[A-Za-z0-9._-]+`` and are never
``.`` or ``..``; every backend re-checks them (``check_key``) so nothing user-given reaches a path
or an object key unvalidated. The registry builds all keys; backends only store bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from adapters.errors import StoreError

SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


# StoreError reasons that mean "the store did not answer properly" (unreachable, timed out, 5xx, disk I/O):
# what a circuit breaker counts. Others (a missing key, a refused key, a 4xx) mean it answered.
OUTAGE_REASONS = frozenset({"unavailable", "io_error"})


@dataclass(frozen=True)
class StoreTimeouts:
    """Bounds of one remote store call: connect and per-socket-read timeouts, and total attempts.

    The read timeout applies to each socket read, so a large blob that keeps arriving is never cut
    off; a store that stops sending fails after ``read_s``. Worst case of one call:
    ``attempts * (connect_s | read_s)`` plus botocore's jittered backoff (< 1 s per retry here).
    """

    connect_s: float = 2.0
    read_s: float = 5.0
    attempts: int = 2


class KeyMissing(KeyError):
    """``Store.get`` on a key that does not exist (the registry turns it into a domain error)."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in (".", "..") or SEGMENT.match(p) is None for p in parts):
        raise StoreError(f"invalid store key {key!r}", reason="bad_key")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a key-like path ending in '/'."""
    if prefix:
        if not prefix.endswith("/"):
            raise StoreError(f"invalid store prefix {prefix!r} (must end with '/')", reason="bad_key")
        check_key(prefix[:-1])
    return prefix


@runtime_checkable
class Store(Protocol):
    """What the registry needs from a backend. Implementations must be safe to share across threads."""

    @property
    def uri(self) -> str: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ``KeyMissing`` when absent."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Create or replace atomically: readers see the old or the new bytes, never a part."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Atomic create-if-absent: True if this call created it, False if the key already existed."""
        ...

    def get_range(self, key: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the object (fewer at its end); raises ``KeyMissing`` when absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (``''`` or ending in ``/``), recursively, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove a key; a missing key is not an error."""
        ...


@runtime_checkable
class Dated(Protocol):
    """A store that can tell when a key was last written (``adapters gc`` spares young orphan blobs)."""

    def modified(self, key: str) -> float:
        """The key's last write as epoch seconds; raises ``KeyMissing`` when absent."""
        ...
