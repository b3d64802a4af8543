"""Adapter references → versions, from memory where possible and within a deadline otherwise.

What the server remembers per adapter id: the last listing of its versions (all numbers and the
deleted ones, with the time it was taken), every version record it read (records are immutable) and
the version ``latest`` last resolved to. With that:

- Only versions the cache holds (device, host or disk tier) are answered from memory: for any other,
  the file has to come from the store anyway, and asking the store first (within the deadline) is
  what makes an uncached adapter fail fast when the store does not answer.
- ``id@N`` held by the cache is answered at once; when its listing is older than ``ttl_s`` it is
  re-listed in the background, so a resident ``id@N`` never waits for the store and a deletion made
  elsewhere stops it being served within about one TTL. A known tombstone is a 404 at once.
- ``id`` (latest) is answered from memory while the listing is younger than ``ttl_s``; after that the
  store is asked (one listing, plus one record read for a version not seen before). If the store
  fails, the remembered ``latest`` is served, marked stale, while the listing is younger than
  ``stale_max_s`` and the version is held by the cache.
- Callers wait for the store until their deadline, never longer (``StoreGate``): the call goes on
  in the background and its result still lands in memory.

Registrations and deletions made through this server update the memory at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from adapters.errors import StoreError
from adapters.records import AdapterVersion
from adapters.refs import AdapterRef
from adapters.registry import Registry
from service.lora.request import AdapterRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
STALE_HEADER = "X-Loraswap-Stale"  # value "adapters": a remembered 'latest' was served (docs/api.md)


@dataclass(frozen=True)
class Resolution:
    """A resolved version; ``stale`` when it is a remembered ``latest`` the store could not confirm."""

    version: AdapterVersion
    stale: bool = False


@dataclass(frozen=True)
class _Listing:
    versions: frozenset[int]
    deleted: frozenset[int]
    at: float  # monotonic time the listing was taken (or confirmed by a registration here)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" for abandoned waits


class StoreGate:
    """Blocking store work on a few threads of its own; async callers wait for it until a deadline.

    ``submit(key, …)`` shares one call among concurrent callers with the same key (single flight).
    """

    def __init__(self, retry_after_s: Callable[[], int], *, threads: int = 4) -> None:
        self._retry_after_s = retry_after_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="loraswap-store")
        self._inflight: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    def submit(self, key: str | None, fn: Callable[[], T]) -> Future[T]:
        if key is None:
            return self._pool.submit(fn)
        with self._lock:
            future = self._inflight.get(key)
            if future is not None:
                return future
            future = self._inflight[key] = self._pool.submit(fn)
        future.add_done_callback(lambda done: self._forget(key, done))
        return future

    def _forget(self, key: str, future: Future[Any]) -> None:
        with self._lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    async def wait(self, future: Future[T], deadline: float, what: str) -> T:
        """``future``'s result, or ``StoreError(reason="deadline")`` once ``deadline`` (monotonic) passed."""
        waiter = asyncio.wrap_future(future)
        waiter.add_done_callback(_consume)  # also when this wait is abandoned or cancelled
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await asyncio.wait({waiter}, timeout=remaining)
        if waiter.done():
            return waiter.result()
        raise StoreError(
            f"the adapter store did not answer {what} in time",
            reason="deadline",
            detail={"retry_after_s": self._retry_after_s()},
            hint="Adapters the server holds are still served; retry after Retry-After seconds.",
        )

    async def call(self, fn: Callable[..., T], *args: Any, deadline: float, what: str, **kwargs: Any) -> T:
        return await self.wait(self.submit(None, partial(fn, *args, **kwargs)), deadline, what)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class AdapterResolver:
    def __init__(
        self,
        registry: Registry,
        gate: StoreGate,
        holds: Callable[[AdapterVersion], bool],
        *,
        ttl_s: float,
        stale_max_s: float,
        on_latest: Callable[[AdapterVersion, int | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.gate = gate
        self.ttl_s = ttl_s
        self.stale_max_s = stale_max_s
        self._holds = holds
        self._on_latest = on_latest
        self._clock = clock
        self._lock = threading.Lock()
        self._listings: dict[str, _Listing] = {}
        self._records: dict[tuple[str, int], AdapterVersion] = {}
        self._latest: dict[str, AdapterVersion] = {}

    # -- entry points -------------------------------------------------------------------------------
    async def resolve(self, request: AdapterRequest, deadline: float) -> Resolution:
        known = self.lookup(request)
        if known is not None:
            return known
        future = self.gate.submit(request.ref, partial(self.fetch, request))
        try:
            return Resolution(await self.gate.wait(future, deadline, f"for {request.ref}"))
        except StoreError as exc:
            return self.fallback(request, exc)

    def resolve_blocking(self, request: AdapterRequest) -> Resolution:
        """``resolve`` for plain threads (start-up pins): the store's own timeouts bound the wait."""
        known = self.lookup(request)
        if known is not None:
            return known
        try:
            return Resolution(self.fetch(request))
        except StoreError as exc:
            return self.fallback(request, exc)

    # -- memory ---------------------------------------------------------------------------------------
    def lookup(self, request: AdapterRequest) -> Resolution | None:
        """The answer from memory, or None when the store must be asked; a known tombstone is a 404."""
        adapter_id, number = request.adapter_id, request.version
        with self._lock:
            listing = self._listings.get(adapter_id)
            if listing is None:
                return None
            fresh = self._clock() - listing.at < self.ttl_s
            if number is None:
                if not fresh:
                    return None
                number = self._pick(request, listing)  # raises when every version is deleted
                record = self._records.get((adapter_id, number))
            else:
                if number in listing.deleted:
                    self._pick(request, listing)  # raises: deleted
                record = self._records.get((adapter_id, number))
        if record is None or not self._holds(record):  # its file must come from the store: ask it first
            return None
        if request.version is None:
            self._remember_latest(record)
            return Resolution(record)
        if fresh:
            return Resolution(record)
        if self.ttl_s > 0:  # serve now, re-list in the background
            self.gate.submit(f"listing:{adapter_id}", partial(self._refresh_quietly, adapter_id))
            return Resolution(record)
        return None

    def fallback(self, request: AdapterRequest, error: StoreError) -> Resolution:
        """What the server holds for ``request`` while the store fails, else ``error`` again."""
        with self._lock:
            listing = self._listings.get(request.adapter_id)
            if request.version is None:
                record = self._latest.get(request.adapter_id)
            else:
                record = self._records.get((request.adapter_id, request.version))
        if record is None or listing is None or record.version in listing.deleted:
            raise error
        if request.version is None and self._clock() - listing.at > self.stale_max_s:
            raise error
        if not self._holds(record):  # its file would have to come from the failing store
            raise error
        return Resolution(record, stale=request.version is None)

    def note_registered(self, version: AdapterVersion) -> None:
        """A version this server created: visible to ``id@N`` and ``latest`` at once."""
        adapter_id, number = version.adapter_id, version.version
        with self._lock:
            known = self._listings.get(adapter_id)
            versions = (known.versions if known else frozenset()) | {number}
            deleted = known.deleted if known else frozenset()
            self._listings[adapter_id] = _Listing(versions, deleted, self._clock())
            self._records[(adapter_id, number)] = version
            newest = number == max(versions - deleted)
        if newest:
            self._remember_latest(version)

    def note_deleted(self, adapter_id: str, numbers: set[int]) -> None:
        """Versions this server tombstoned: 404 at once, and no longer a remembered ``latest``."""
        with self._lock:
            known = self._listings.get(adapter_id)
            if known is not None:
                self._listings[adapter_id] = _Listing(
                    known.versions | numbers, known.deleted | numbers, known.at
                )
            latest = self._latest.get(adapter_id)
            if latest is not None and latest.version in numbers:
                del self._latest[adapter_id]

    # -- the store ------------------------------------------------------------------------------------
    def fetch(self, request: AdapterRequest) -> AdapterVersion:
        """Re-list the id and read the selected record unless it is known (blocking store I/O)."""
        listing = self._refresh(request.adapter_id)
        number = self._pick(request, listing)
        with self._lock:
            record = self._records.get((request.adapter_id, number))
        if record is None:
            record = self.registry.record(request.adapter_id, number)
            with self._lock:
                self._records[(request.adapter_id, number)] = record
        if request.version is None:
            self._remember_latest(record)
        return record

    def _refresh(self, adapter_id: str) -> _Listing:
        taken = self._clock()
        versions, deleted = self.registry.state(adapter_id)
        listing = _Listing(frozenset(versions), frozenset(deleted), taken)
        with self._lock:
            current = self._listings.get(adapter_id)
            if current is None or current.at <= taken:
                self._listings[adapter_id] = listing
            latest = self._latest.get(adapter_id)
            if latest is not None and latest.version in listing.deleted:
                del self._latest[adapter_id]  # deleted elsewhere: never serve it as stale
        return listing

    def _refresh_quietly(self, adapter_id: str) -> None:
        try:
            self._refresh(adapter_id)
        except Exception as exc:  # background work: the next request that needs the store reports it
            log.debug("background listing of %s failed: %s", adapter_id, exc)

    def _pick(self, request: AdapterRequest, listing: _Listing) -> int:
        ref = AdapterRef(request.adapter_id, request.version, explicit=request.version is not None)
        return self.registry.pick(ref, set(listing.versions), set(listing.deleted))

    def _remember_latest(self, record: AdapterVersion) -> None:
        with self._lock:
            previous = self._latest.get(record.adapter_id)
            self._latest[record.adapter_id] = record
        if previous is None or previous.version != record.version:
            self._on_latest(record, previous.version if previous else None)
