"""The tiered adapter cache: leases block eviction, LRU order, disk tier for remote stores."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters import tempfiles
from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from service.lora.cache import AdapterCache, Budgets, key_of
from service.lora.model_manager import LoRAModelManager
from service.metrics import Metrics
from tests.adapters.conftest import moto_endpoint, s3_bucket, save_bytes  # noqa: F401  (fixtures)
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.test_lifecycle import metric_samples, value


@pytest.fixture(scope="module")
def lora_bytes(base_model: Any) -> list[bytes]:
    tensors = diffusers_layout(make_case(base_model.pipe))
    return [save_bytes({k: v * (1 + i) for k, v in tensors.items()}) for i in range(3)]


@pytest.fixture
def manager(base_model: Any) -> Any:
    models = LoRAModelManager(base_model.lora_components)
    yield models
    models.remove()


def make_cache(
    registry: Registry, manager: LoRAModelManager, tmp_path: Path, device_bytes: int
) -> AdapterCache:
    budgets = Budgets(device_bytes=device_bytes, host_bytes=1 << 30, disk_bytes=1 << 30)
    return AdapterCache(
        registry, manager.targets, torch.device("cpu"), torch.float32, budgets, tmp_path / "disk", Metrics()
    )


def test_leased_adapters_are_never_evicted(
    base_model: Any, manager: LoRAModelManager, lora_bytes: list[bytes], tmp_path: Path
) -> None:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    versions = [registry.register(data, f"a{i}") for i, data in enumerate(lora_bytes)]
    one = sum(t.nbytes for t in registry.open(versions[0]).tensors.values())
    cache = make_cache(registry, manager, tmp_path, device_bytes=one + one // 2)  # room for one

    async def scenario() -> None:
        await cache.acquire(versions[0])
        await cache.acquire(versions[1])  # over budget, but both are leased
        assert set(cache.resident()) == {key_of(versions[0]), key_of(versions[1])}
        cache.release(versions[0])  # now evictable: the least recently used goes
        assert cache.resident() == [key_of(versions[1])]
        cache.release(versions[1])
        await cache.acquire(versions[2])
        assert cache.resident() == [key_of(versions[2])]
        cache.release(versions[2])

    asyncio.run(scenario())
    cache.close()


def test_pinned_adapters_survive_pressure(
    base_model: Any, manager: LoRAModelManager, lora_bytes: list[bytes], tmp_path: Path
) -> None:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    versions = [registry.register(data, f"a{i}") for i, data in enumerate(lora_bytes)]
    cache = make_cache(registry, manager, tmp_path, device_bytes=1)
    cache.load_blocking(versions[0], pin=True)

    async def scenario() -> None:
        for version in versions[1:]:
            await cache.acquire(version)
            cache.release(version)

    asyncio.run(scenario())
    assert cache.resident() == [key_of(versions[0])]
    cache.close()


def test_remote_store_blobs_are_cached_on_local_disk(
    start_server: Any,
    base_model: Any,
    lora_bytes: list[bytes],
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
) -> None:
    uri = f"s3://{s3_bucket}/fleet"
    registry = Registry(
        open_store(uri, s3_endpoint_url=moto_endpoint), BaseIdentity.from_base_model(base_model)
    )
    version = registry.register(lora_bytes[0], "remote")
    request = {"prompt": "a", "steps": 1, "adapters": [{"id": "remote"}]}

    first = start_server(home=tmp_path, store=uri, s3_endpoint_url=moto_endpoint)
    with first.client() as http:
        assert http.post("/v1/generate", json=request).status_code == 200
    samples = metric_samples(first)
    assert value(samples, "loraswap_adapter_cache_misses_total", tier="disk") == 1
    assert value(samples, "loraswap_adapter_load_seconds_count", source="store") == 1
    assert (tmp_path / "cache" / "adapters" / f"{version.sha256}.safetensors").is_file()
    first.stop()

    second = start_server(home=tmp_path, store=uri, s3_endpoint_url=moto_endpoint)  # cold RAM, warm disk
    with second.client() as http:
        assert http.post("/v1/generate", json=request).status_code == 200
    samples = metric_samples(second)
    assert value(samples, "loraswap_adapter_cache_hits_total", tier="disk") == 1
    assert value(samples, "loraswap_adapter_load_seconds_count", source="disk") == 1
    assert value(samples, "loraswap_adapter_cache_entries", tier="disk") == 1


def test_a_modified_blob_is_verified_again(
    base_model: Any, manager: LoRAModelManager, lora_bytes: list[bytes], tmp_path: Path
) -> None:
    from adapters.errors import AdapterCorrupt
    from adapters.records import blob_key

    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    version = registry.register(lora_bytes[0], "a")
    cache = make_cache(registry, manager, tmp_path, device_bytes=1 << 30)
    cache.load_blocking(version)
    cache.drop(lambda key: True)  # evict from device and host: the next load reads the file again
    cache.load_blocking(version)  # unchanged file: same stamp, loads without re-hashing
    cache.drop(lambda key: True)
    blob = tmp_path / "store" / blob_key(version.sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor; the header still parses
    blob.write_bytes(bytes(data))
    with pytest.raises(AdapterCorrupt, match="sha256"):
        cache.load_blocking(version)
    cache.close()


def test_a_disk_tier_copy_is_hashed_once_per_process_and_stays_lru(
    base_model: Any,
    manager: LoRAModelManager,
    lora_bytes: list[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    moto_endpoint: str,
    s3_bucket: str,
) -> None:
    """Marking a disk-tier copy used must not change the stamp it was verified with: cold loads after
    the first hash nothing and sum no values (they used to re-hash every time, the touch having moved
    the mtime), and the least recently used copy is still the one evicted."""
    from adapters import opening

    hashed: list[str] = []

    verify = opening.verify_digest

    def counting(version: Any, buffer: torch.Tensor) -> None:
        hashed.append(version.adapter_id)
        verify(version, buffer)

    monkeypatch.setattr(opening, "verify_digest", counting)
    summed: list[int] = []
    finite = opening.check_finite_region
    monkeypatch.setattr(opening, "check_finite_region", lambda files: summed.append(1) or finite(files))
    store = open_store(f"s3://{s3_bucket}/fleet", s3_endpoint_url=moto_endpoint)  # a disk tier in front
    registry = Registry(store, BaseIdentity.from_base_model(base_model))
    versions = [registry.register(data, f"a{i}") for i, data in enumerate(lora_bytes)]
    cache = make_cache(registry, manager, tmp_path, device_bytes=1 << 30)
    assert cache.disk is not None
    for _ in range(4):
        cache.load_blocking(versions[0])
        cache.drop(lambda key: True)
    # the store's copy on the first load, the disk tier's on its first read here, then never again:
    # neither the hash nor the values of bytes this process verified and checked (the same stamp)
    assert hashed == ["a0", "a0"] and len(summed) == 2
    cache.load_blocking(versions[1])
    cache.load_blocking(versions[2])  # a2 and a1 are newer than a0 (a write sets the access time)
    cache.drop(lambda key: True)
    cache.load_blocking(versions[0])  # a0 used last: a1 is now the least recently used copy
    cache.disk.budget = cache.disk.nbytes - 1
    assert cache.disk._evict() == 1
    assert not cache.disk.path(versions[1].sha256).exists()
    assert cache.disk.path(versions[0].sha256).exists() and cache.disk.path(versions[2].sha256).exists()
    cache.close()


def test_stale_disk_tier_temp_files_are_swept_when_the_cache_opens(
    base_model: Any,
    manager: LoRAModelManager,
    lora_bytes: list[bytes],
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
) -> None:
    """A server killed while copying a blob into the disk tier left its temp file there for good."""
    disk = tmp_path / "disk"
    disk.mkdir()
    sha = "ab" * 32
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = disk / f".tmp-{tempfiles.HOST}-{int(exited.stdout)}-x1"  # its writer is gone
    legacy_old = disk / f".{sha}.4242.1.tmp"  # the name before owner-named temps, from a day ago
    legacy_new = disk / f".{'cd' * 32}.4242.1.tmp"  # the same, written a minute ago: maybe in flight
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        in_flight = disk / f".tmp-{tempfiles.HOST}-{live.pid}-x2"  # a writer still running
        for path in (dead, legacy_old, legacy_new, in_flight):
            path.write_bytes(b"half a blob")
        day_ago = time.time() - 86400
        os.utime(legacy_old, (day_ago, day_ago))

        registry = Registry(
            open_store(f"s3://{s3_bucket}/fleet", s3_endpoint_url=moto_endpoint),
            BaseIdentity.from_base_model(base_model),
        )
        version = registry.register(lora_bytes[0], "remote")
        cache = make_cache(registry, manager, tmp_path, device_bytes=1 << 30)
        assert cache.disk is not None
        assert not dead.exists() and not legacy_old.exists()
        assert in_flight.exists() and legacy_new.exists()
        assert (cache.disk.entries, cache.disk.nbytes) == (0, 0)  # a temp file is not an entry

        cache.load_blocking(version)  # from the store, copied into the disk tier through a temp file
        assert sorted(p.name for p in disk.iterdir()) == sorted(
            [f"{version.sha256}.safetensors", in_flight.name, legacy_new.name]
        )
        assert cache.disk.entries == 1
        cache.close()
    finally:
        live.kill()
        live.wait(60)


def test_disk_tier_copies_are_fsynced_file_then_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy in the disk tier is durable: its bytes are fsynced before the rename, the folder after it
    (it was renamed unsynced, so a power loss could leave an empty or partial entry under a sha256 name)."""
    from service.lora.disk_tier import DiskTier

    tier = DiskTier(tmp_path / "disk", budget=1 << 20)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sha = "ab" * 32
    tier.write(sha, b"x" * 100)
    assert tier.path(sha).read_bytes() == b"x" * 100
    root = str((tmp_path / "disk").resolve())
    assert len(synced) == 2, synced
    assert Path(synced[0]).parent == Path(root) and Path(synced[0]).name.startswith(".tmp-")
    assert synced[1] == root


def _storages(adapter: Any) -> set[int]:
    """The addresses of the memory an adapter's layers read."""
    layers = adapter.modules.values()
    return {t.untyped_storage().data_ptr() for layer in layers for t in (layer.down, layer.up)}


def test_cold_loads_recycle_memory_only_once_nothing_uses_it(
    base_model: Any, manager: LoRAModelManager, lora_bytes: list[bytes], tmp_path: Path
) -> None:
    """A CPU cold load reads into the buffer of an evicted adapter, never into one a request still
    holds (its LoRA pairs are views of it), and serves the same values as a plain load."""
    from safetensors.torch import load

    from adapters.buffers import BufferPool
    from service.lora.weights import DeviceAdapter

    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    half = [save_bytes({k: t.half() for k, t in load(data).items()}) for data in lora_bytes]  # converted
    versions = [registry.register(data, f"a{i}") for i, data in enumerate(half)]
    cache = make_cache(registry, manager, tmp_path, device_bytes=1 << 30)
    assert cache.buffers is not None
    cache.buffers = BufferPool(1 << 30, min_bytes=0)  # tiny-sd's files are under the default 1 MiB

    def fresh(index: int) -> DeviceAdapter:
        loaded = registry.open(versions[index])
        tensors = loaded.materialise(torch.device("cpu"), torch.float32)
        return DeviceAdapter.build("ref", tensors, manager.targets, torch.device("cpu"), torch.float32)

    def same(adapter: DeviceAdapter, reference: DeviceAdapter) -> bool:
        """Compact (fp16 views) and the plain fp32 build compute the same update."""
        pairs = [(layer, reference.modules[name]) for name, layer in adapter.modules.items()]
        linear = [(a, b, torch.randn(3, a.down.shape[1])) for a, b in pairs if a.down.dim() == 2]
        return (
            bool(linear)
            and all(a.down.dtype == torch.float16 and b.down.dtype == torch.float32 for a, b in pairs)
            and all(torch.equal(a.dense_delta(), b.dense_delta()) for a, b in pairs)
            and all(torch.equal(a.delta(x), b.delta(x)) for a, b, x in linear)
        )

    first = cache.load_blocking(versions[0])  # a request still running with it keeps this reference
    cache.drop(lambda _key: True)
    second = cache.load_blocking(versions[1])
    assert not _storages(first) & _storages(second)  # nothing of ``first`` was handed out again
    assert same(first, fresh(0)) and same(second, fresh(1))
    recycled = _storages(first)
    del first  # the request is done: the memory is free
    cache.drop(lambda _key: True)
    third = cache.load_blocking(versions[2])
    assert _storages(third) <= recycled | _storages(second) and _storages(third) & recycled
    assert same(third, fresh(2))
    assert cache.buffers.stats.taken == 3 and cache.buffers.stats.reused == 1  # the third read
    cache.close()


def test_a_build_from_views_reads_no_value(
    base_model: Any, manager: LoRAModelManager, lora_bytes: list[bytes], tmp_path: Path
) -> None:
    """A cold load builds a compact adapter while the file's bytes still arrive: ``views_only`` may only
    view the tensors (every torch call it makes is recorded), and whatever would read a value (a dtype
    conversion, a LyCORIS delta, embedding vectors) raises ``NeedsValues`` before doing it."""
    from torch.overrides import TorchFunctionMode

    from service.lora.weights import DeviceAdapter, NeedsValues

    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    tensors = registry.open(registry.register(lora_bytes[0], "a")).tensors
    half = {k: t.half() for k, t in tensors.items()}
    cpu = torch.device("cpu")
    with Calls() as calls:
        adapter = DeviceAdapter.build(
            "a", half, manager.targets, cpu, torch.float32, compact=True, views_only=True
        )
    assert adapter.modules and calls.names
    views = {"contiguous", "is_contiguous", "is_floating_point", "flatten", "__getitem__", "__get__", "dim"}
    views.add("empty")  # torch.empty(0, device=...): where the layers live, read from no tensor
    assert calls.names <= views, calls.names - views
    for layer in adapter.modules.values():  # the very tensors given: nothing copied
        assert any(layer.down.data_ptr() == t.data_ptr() for t in half.values())  # type: ignore[union-attr]
    with pytest.raises(NeedsValues):  # an fp32 file on a bf16 model: a conversion
        DeviceAdapter.build("a", tensors, manager.targets, cpu, torch.bfloat16, compact=True, views_only=True)
    loha = {"unet.x.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(NeedsValues):
        DeviceAdapter.build("a", loha, manager.targets, cpu, torch.float32, compact=True, views_only=True)
