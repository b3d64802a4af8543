"""The tiered adapter cache: device (ready to run) → host RAM → local disk → the store.

Each tier is an LRU with a byte budget. Entries are keyed by ``(id, version, sha256)`` kept as a
tuple, so no two parts can run together into a colliding key. A *lease* marks a device entry as used
by queued or in-flight work: leased entries are never evicted (the budget may be exceeded for as
long as that lasts), and pinned entries are never evicted at all. Loading runs on a small thread pool
outside the inference worker, so a cold adapter never blocks requests that use resident ones, and
concurrent requests for the same cold adapter share one load (single flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.buffers import BufferPool
from adapters.errors import AdapterCorrupt
from adapters.readahead import ReadAhead
from adapters.records import AdapterVersion, blob_key
from adapters.registry import LoadedAdapter, Registry
from adapters.sources.breaker import unwrap
from adapters.sources.local import LocalStore
from adapters.views import Stamp, as_buffer
from service.lora.disk_tier import DiskTier
from service.lora.weights import DeviceAdapter, NeedsValues
from service.metrics import Metrics

log = logging.getLogger(__name__)

CacheKey = tuple[str, int, str]
TIERS = ("device", "host", "disk")


def key_of(version: AdapterVersion) -> CacheKey:
    return (version.adapter_id, version.version, version.sha256)


@dataclass
class _DeviceEntry:
    adapter: DeviceAdapter
    metadata_scale: float | None
    leases: int = 0
    pinned: bool = False


@dataclass
class _HostEntry:
    loaded: LoadedAdapter
    nbytes: int


@dataclass
class Budgets:
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    # free memory kept for cold loads on a CPU model (``adapters.buffers.BufferPool``); 0: none kept
    pool_bytes: int = 256 << 20


@dataclass
class TierStats:
    entries: dict[str, int] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)


class AdapterCache:
    def __init__(
        self,
        registry: Registry,
        targets: dict[str, nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        budgets: Budgets,
        disk_root: Path,
        metrics: Metrics,
        *,
        loader_threads: int = 2,
        base_weight: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        """``base_weight``: module name → its weight as loaded (DoRA deltas are built against it)."""
        self.registry = registry
        self.targets = targets
        self.base_weight = base_weight
        self.device = device
        self.dtype = dtype
        self.budgets = budgets
        self.metrics = metrics
        # a local store already is a disk tier: no second copy of its blobs
        self.disk = (
            None
            if isinstance(unwrap(registry.store), LocalStore)
            else DiskTier(disk_root, budgets.disk_bytes)
        )
        self._device: OrderedDict[CacheKey, _DeviceEntry] = OrderedDict()
        self._host: OrderedDict[CacheKey, _HostEntry] = OrderedDict()
        self._device_bytes = 0
        self._host_bytes = 0
        # sha256 → stamp of a local file whose bytes were verified against that sha256 in this process
        self._verified: dict[str, Stamp] = {}
        # CPU memory has no caching allocator: recycle the read buffers and converted tensors of evicted
        # adapters for the next cold load (CUDA's device and page-locked host allocators already do)
        self.buffers = BufferPool(budgets.pool_bytes) if device.type == "cpu" else None
        # a cold load's file arrives on a reader thread while its header is parsed (``adapters.readahead``)
        self.reader = ReadAhead()
        self._lock = threading.Lock()
        self._inflight: dict[CacheKey, asyncio.Future[DeviceAdapter]] = {}
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="loraswap-load")

    # -- leases -----------------------------------------------------------------------------------
    async def acquire(self, version: AdapterVersion) -> DeviceAdapter:
        """A ready-to-run adapter, leased until ``release``; loads it (once) when cold."""
        key = key_of(version)
        with self._lock:
            entry = self._device.get(key)
            if entry is not None:
                entry.leases += 1
                self._device.move_to_end(key)
                self._hit("device")
                return entry.adapter
        pending = self._inflight.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._pool, self._load, version)
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        adapter = await asyncio.shield(pending)
        with self._lock:
            entry = self._device.get(key)
            if entry is None:  # evicted between load and lease (tiny budget): re-insert
                entry = self._insert_device(key, adapter, version.scale_default)
            entry.leases += 1
        return adapter

    def release(self, version: AdapterVersion) -> None:
        with self._lock:
            entry = self._device.get(key_of(version))
            if entry is not None and entry.leases > 0:
                entry.leases -= 1
            self._evict_device()
            self._publish()

    def lookup_resident(self, version: AdapterVersion, *, pin: bool = False) -> DeviceAdapter | None:
        """The device entry of ``version`` if it is resident (marked used, pinned if asked), else None:
        a lookup under the lock, cheap enough for the event loop (no thread hand-off)."""
        key = key_of(version)
        with self._lock:
            entry = self._device.get(key)
            if entry is None:
                return None
            entry.pinned |= pin
            self._device.move_to_end(key)
            self._hit("device")
            return entry.adapter

    def load_blocking(self, version: AdapterVersion, *, pin: bool = False) -> DeviceAdapter:
        """Load into the device tier from a plain thread (pre-warming at start-up, preload)."""
        return self._load(version, pin=pin)

    def drop(self, predicate: Callable[[CacheKey], bool]) -> int:
        """Invalidate matching entries in the device and host tiers (leased ones stay until released)."""
        dropped = 0
        with self._lock:
            for key in [k for k, e in self._device.items() if predicate(k) and not e.leases and not e.pinned]:
                self._device_bytes -= self._device.pop(key).adapter.nbytes
                dropped += 1
            for key in [k for k in self._host if predicate(k)]:
                self._host_bytes -= self._host.pop(key).nbytes
            self._publish()
        return dropped

    def forget_reads(self, version: AdapterVersion) -> None:
        """Forget that this process read ``version``'s file (its verified stamp and its checked header):
        its next cold load is a first read again (benchmarks)."""
        with self._lock:
            self._verified.pop(version.sha256, None)
        self.registry.forget_header(version.sha256)

    def resident(self) -> list[CacheKey]:
        with self._lock:
            return list(self._device)

    def tiers(self) -> dict[str, Any]:
        """What each tier holds now, most recently used last (the console's server view)."""
        with self._lock:
            device = [
                {
                    "ref": f"{k[0]}@{k[1]}",
                    "sha256": k[2],
                    "bytes": e.adapter.nbytes,
                    "pinned": e.pinned,
                    "leases": e.leases,
                }
                for k, e in self._device.items()
            ]
            host = [
                {"ref": f"{k[0]}@{k[1]}", "sha256": k[2], "bytes": e.nbytes} for k, e in self._host.items()
            ]
        budgets = self.budgets
        return {
            "device": {"entries": device, "budget_bytes": budgets.device_bytes},
            "host": {"entries": host, "budget_bytes": budgets.host_bytes},
            "disk": None
            if self.disk is None
            else {
                "entries": self.disk.entries,
                "bytes": self.disk.nbytes,
                "budget_bytes": budgets.disk_bytes,
            },
        }

    def holds(self, version: AdapterVersion) -> bool:
        """Whether ``version`` can be made ready without the store: on the device, in host RAM or in
        the disk tier (a local store's own files do not count: reading them is store I/O)."""
        key = key_of(version)
        with self._lock:
            if key in self._device or key in self._host:
                return True
        return self.disk is not None and self.disk.path(version.sha256).is_file()

    # -- loading ----------------------------------------------------------------------------------
    def _load(self, version: AdapterVersion, pin: bool = False) -> DeviceAdapter:
        key = key_of(version)
        with self._lock:
            entry = self._device.get(key)
            if entry is not None:
                entry.pinned |= pin
                return entry.adapter
            host = self._host.get(key)
            if host is not None:
                self._host.move_to_end(key)
        started = time.perf_counter()
        non_blocking = self.device.type == "cuda"
        # on a CPU model LoRA pairs stay views of the file read, in its dtype (``DeviceAdapter.build``)
        compact = self.device.type == "cpu"
        built: list[DeviceAdapter] = []
        if host is None:
            self._miss("device")
            self._miss("host")
            # a compact build reads no value: it runs while the file's bytes are still arriving
            meanwhile = partial(self._build_views, version, built) if compact else None
            loaded, source = self._read(version, meanwhile)  # on CUDA, read into page-locked memory
            host = _HostEntry(loaded, sum(t.nbytes for t in loaded.tensors.values()))
            with self._lock:
                if key not in self._host:
                    self._host[key] = host
                    self._host_bytes += host.nbytes
                self._evict_host()
        else:
            self._miss("device")
            self._hit("host")
            source = "host"
        if built:
            adapter = built[0]
        elif compact:
            adapter = self._build(version, host.loaded.tensors, compact=True)
        else:
            tensors = host.loaded.materialise(self.device, self.dtype, non_blocking=non_blocking)
            adapter = self._build(version, tensors, non_blocking=non_blocking)
        self.metrics.adapter_load.labels(source=source).observe(time.perf_counter() - started)
        with self._lock:
            self._insert_device(key, adapter, version.scale_default).pinned |= pin
            self._evict_device()
            self._publish()
        return adapter

    def _build(self, version: AdapterVersion, tensors: dict[str, torch.Tensor], **how: bool) -> DeviceAdapter:
        """``DeviceAdapter.build`` of ``version`` for this cache's modules, device and dtype."""
        key = f"{version.adapter_id}@{version.version}"
        return DeviceAdapter.build(
            key, tensors, self.targets, self.device, self.dtype, base_weight=self.base_weight, **how
        )

    def _build_views(
        self, version: AdapterVersion, built: list[DeviceAdapter], tensors: dict[str, torch.Tensor]
    ) -> None:
        """A compact device entry built from a file's views while its bytes still arrive (none when the
        build would read a value: ``NeedsValues``); it is used once the file has passed every check."""
        with contextlib.suppress(NeedsValues):
            built.append(self._build(version, tensors, compact=True, views_only=True))

    def _read(
        self,
        version: AdapterVersion,
        meanwhile: Callable[[dict[str, torch.Tensor]], object] | None = None,
    ) -> tuple[LoadedAdapter, str]:
        """Bytes from the disk tier (or a local store), else the store; read once, verified and parsed.

        A local file's hash (``Registry.open_file``: BLAKE3, or sha256 for older records) and its values
        are checked on its first read in this process and again whenever the file read is not the one
        verified (other inode, size or mtime): the issue's rule, no check dropped for bytes not verified
        in this process. Every read runs the header and structure checks (a header whose exact bytes
        passed before is not parsed again: the same bytes give the same verdict). A disk
        tier copy that fails its hash is removed and fetched again; a store file that fails it raises
        ``AdapterCorrupt`` naming the version. Both are counted in ``loraswap_adapter_corrupt_total``.
        """
        pin = self.device.type == "cuda"  # page-locked host memory makes the device upload async
        local = self._local_path(version)
        opened = self.reader.open(local, pin=pin, pool=self.buffers) if local is not None else None
        if opened is not None:
            self._hit("disk")
            if self.disk is not None:
                self.disk.touch(version.sha256, opened.stamp[2])
            verify = self._verified.get(version.sha256) != opened.stamp
            try:
                # the same file as one verified and checked here before: neither hash nor values again
                loaded = self.registry.open_file(
                    version, opened, verify=verify, values=verify, meanwhile=meanwhile
                )
            except AdapterCorrupt as exc:
                self._corrupt(exc, "disk" if self.disk is not None else "store")
                if self.disk is None:
                    raise
                log.warning("%s; removing the disk tier's copy and fetching it again", exc.message)
                self.disk.remove(version.sha256)
            else:
                self._verified[version.sha256] = opened.stamp
                return loaded, "disk"
        if self.disk is None:  # a local store whose blob is gone: let the registry raise its error
            return self._open_from_store(version, pin), "disk"
        self._miss("disk")
        data = self.registry.read_blob(version)
        loaded = self._open_from_store(version, pin, data)  # verifies the hash before caching
        evicted = self.disk.write(version.sha256, data)
        self.metrics.cache_evictions.labels(tier="disk").inc(evicted)
        return loaded, "store"

    def _open_from_store(
        self, version: AdapterVersion, pin: bool, data: bytes | None = None
    ) -> LoadedAdapter:
        try:
            data = self.registry.read_blob(version) if data is None else data
            return self.registry.open_data(version, as_buffer(data, pin=pin))
        except AdapterCorrupt as exc:
            self._corrupt(exc, "store")
            raise

    def _corrupt(self, exc: AdapterCorrupt, tier: str) -> None:
        self.metrics.adapter_corrupt.labels(tier=tier, reason=exc.reason or "unknown").inc()

    def _local_path(self, version: AdapterVersion) -> Path | None:
        if self.disk is not None:
            return self.disk.path(version.sha256)
        store = unwrap(self.registry.store)
        return store.local_path(blob_key(version.sha256)) if isinstance(store, LocalStore) else None

    # -- bookkeeping (call with the lock held) ------------------------------------------------------
    def _insert_device(self, key: CacheKey, adapter: DeviceAdapter, scale: float | None) -> _DeviceEntry:
        entry = self._device.get(key)
        if entry is None:
            entry = self._device[key] = _DeviceEntry(adapter, scale)
            self._device_bytes += adapter.nbytes
        self._device.move_to_end(key)
        return entry

    def _evict_device(self) -> None:
        if self._device_bytes <= self.budgets.device_bytes:
            return
        for key in list(self._device):
            if self._device_bytes <= self.budgets.device_bytes:
                break
            entry = self._device[key]
            if entry.leases or entry.pinned:
                continue
            del self._device[key]
            self._device_bytes -= entry.adapter.nbytes
            self.metrics.cache_evictions.labels(tier="device").inc()

    def _evict_host(self) -> None:
        while self._host_bytes > self.budgets.host_bytes and len(self._host) > 1:
            _, entry = self._host.popitem(last=False)
            self._host_bytes -= entry.nbytes
            self.metrics.cache_evictions.labels(tier="host").inc()

    def _publish(self) -> None:
        m = self.metrics
        m.cache_entries.labels(tier="device").set(len(self._device))
        m.cache_bytes.labels(tier="device").set(self._device_bytes)
        m.cache_entries.labels(tier="host").set(len(self._host))
        m.cache_bytes.labels(tier="host").set(self._host_bytes)
        if self.disk is not None:
            m.cache_entries.labels(tier="disk").set(self.disk.entries)
            m.cache_bytes.labels(tier="disk").set(self.disk.nbytes)

    def _hit(self, tier: str) -> None:
        self.metrics.cache_hits.labels(tier=tier).inc()

    def _miss(self, tier: str) -> None:
        self.metrics.cache_misses.labels(tier=tier).inc()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.reader.shutdown()
