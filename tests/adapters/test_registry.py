"""The registry over both store backends (local folder and S3 through moto + boto3)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from adapters.errors import AdapterCorrupt, AdapterInvalid, AdapterNotFound
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, InferencePlan
from adapters.records import blob_key
from adapters.registry import Registry
from adapters.sources import Store
from basemodel.errors import ConfigError
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import LoraCase, expected_canonical, kohya_layout


@pytest.fixture(scope="module")
def kohya_bytes(lora_case: LoraCase) -> bytes:
    return save_bytes(kohya_layout(lora_case), {"ss_steps": "321", "ss_output_name": "inky"})


def test_register_resolve_open_round_trip(
    registry: Registry, kohya_bytes: bytes, lora_case: LoraCase
) -> None:
    meta = AdapterMetadata(
        trigger_words=["inky"],
        inference=InferencePlan(
            prompts=["inky cat"], negative_prompt="blurry", guidance_scale=5.0, seeds=[3]
        ),
    )
    version = registry.register(kohya_bytes, "inky", meta, scale_default=0.75)
    assert (version.adapter_id, version.version, version.ref) == ("inky", 1, "inky@1")
    assert version.source_format == "kohya" and version.rank == 4 and version.alpha == 8.0
    assert version.components == ["text_encoder", "unet"] and version.scale_default == 0.75
    assert version.to_dict()["ref"] == "inky@1"
    for ref in ("inky", "inky@latest", "inky@1"):
        assert registry.resolve(ref) == version
    loaded = registry.open(version)
    expected = expected_canonical(lora_case)
    assert sorted(loaded.tensors) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded.tensors[key], tensor, rtol=0, atol=1e-6)
    m = loaded.metadata
    assert (m.adapter_id, m.version, m.source_format, m.scale_default) == ("inky", 1, "kohya", 0.75)
    assert m.trigger_words == ["inky"] and m.inference and m.inference.negative_prompt == "blurry"
    assert m.training and m.training.steps == 321  # from the kohya ss_* keys
    assert m.title == "inky"
    assert m.base_model and m.base_model.architecture_id == version.base_model.architecture_id
    assert registry.open("inky@1").version == version


def test_versions_increment_identical_content_returns_existing(
    registry: Registry, kohya_bytes: bytes
) -> None:
    v1 = registry.register(kohya_bytes, "a")
    assert registry.register(kohya_bytes, "a") == v1  # same tensors, same metadata
    v2 = registry.register(kohya_bytes, "a", {"title": "new title"})
    v3 = registry.register(kohya_bytes, "a", scale_default=0.5)
    assert (v1.version, v2.version, v3.version) == (1, 2, 3)
    assert registry.register(kohya_bytes, "a", {"title": "new title"}) == v2
    assert registry.register(kohya_bytes, "b").version == 1  # versions are per id
    assert [v.version for v in registry.versions("a")] == [1, 2, 3]
    assert registry.latest_version("a") == 3
    assert [(s.adapter_id, s.latest.version if s.latest else None) for s in registry.list()] == [
        ("a", 3),
        ("b", 1),
    ]


def test_delete_tombstones_and_numbers_are_never_reused(registry: Registry, kohya_bytes: bytes) -> None:
    for title in ("one", "two", "three"):
        registry.register(kohya_bytes, "d", {"title": title})
    deleted = registry.delete("d@3")
    assert [v.ref for v in deleted] == ["d@3"] and deleted[0].deleted
    assert registry.resolve("d").version == 2
    with pytest.raises(AdapterNotFound) as err:
        registry.resolve("d@3")
    assert err.value.reason == "deleted"
    again = registry.register(kohya_bytes, "d", {"title": "three"})  # same content as the deleted one
    assert again.version == 4
    registry.delete("d@latest")
    assert registry.latest_version("d") == 2
    assert [v.ref for v in registry.delete("d")] == ["d@1", "d@2"]
    for ref in ("d", "d@latest", "d@1"):
        with pytest.raises(AdapterNotFound):
            registry.resolve(ref)
    with pytest.raises(AdapterNotFound):
        registry.delete("d")
    assert registry.list() == []
    summary = registry.list(include_deleted=True)[0]
    assert (summary.adapter_id, summary.latest, summary.versions, summary.deleted) == ("d", None, 4, 4)
    assert [v.deleted for v in registry.versions("d", include_deleted=True)] == [True] * 4
    assert registry.register(kohya_bytes, "d").version == 5


def test_purge_removes_the_blob(registry: Registry, store: Store, kohya_bytes: bytes) -> None:
    version = registry.register(kohya_bytes, "p")
    assert store.exists(blob_key(version.sha256))
    registry.delete("p@1", purge=True)
    assert not store.exists(blob_key(version.sha256))


def test_not_found_errors(registry: Registry, kohya_bytes: bytes) -> None:
    with pytest.raises(AdapterNotFound) as err:
        registry.resolve("ghost")
    assert err.value.reason == "unknown_id"
    registry.register(kohya_bytes, "real")
    with pytest.raises(AdapterNotFound) as err:
        registry.resolve("real@9")
    assert err.value.reason == "unknown_version" and err.value.detail["latest"] == 1
    assert registry.latest_version("ghost") is None


def test_another_process_registering_is_detected_cheaply(
    store: Store, base_identity: BaseIdentity, kohya_bytes: bytes
) -> None:
    server_view = Registry(store)  # no base needed to watch
    writer = Registry(store, base_identity)  # e.g. the CLI or a trainer elsewhere
    before = server_view.revision("w")
    assert server_view.latest_version("w") is None
    writer.register(kohya_bytes, "w")
    assert server_view.latest_version("w") == 1
    after_add = server_view.revision("w")
    writer.delete("w@1")
    assert len({before, after_add, server_view.revision("w")}) == 3
    assert server_view.latest_version("w") is None


def test_read_verifies_sha256(registry: Registry, store: Store, kohya_bytes: bytes) -> None:
    version = registry.register(kohya_bytes, "t")
    data = bytearray(store.get(blob_key(version.sha256)))
    data[-1] ^= 0x01  # one flipped bit in the last tensor
    store.put(blob_key(version.sha256), bytes(data))
    with pytest.raises(AdapterCorrupt) as err:
        registry.open(version)
    assert err.value.reason == "sha256_mismatch"
    store.delete(blob_key(version.sha256))
    with pytest.raises(AdapterCorrupt) as err:
        registry.open("t")
    assert err.value.reason == "blob_missing"


def test_stored_blob_is_content_addressed(registry: Registry, store: Store, kohya_bytes: bytes) -> None:
    version = registry.register(kohya_bytes, "c")
    data = store.get(blob_key(version.sha256))
    assert hashlib.sha256(data).hexdigest() == version.sha256 and len(data) == version.size


def test_concurrent_registrations_get_distinct_versions(registry: Registry, kohya_bytes: bytes) -> None:
    titles = [f"t{i}" for i in range(6)]
    results: dict[str, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(titles))

    def work(title: str) -> None:
        try:
            barrier.wait()
            results[title] = registry.register(kohya_bytes, "race", {"title": title}).version
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in titles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(results.values()) == list(range(1, len(titles) + 1))
    for title, number in results.items():  # nobody overwrote anybody
        assert registry.open(f"race@{number}").metadata.title == title


def test_concurrent_identical_registrations_converge(registry: Registry, kohya_bytes: bytes) -> None:
    versions: list[int] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        versions.append(registry.register(kohya_bytes, "same").version)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert versions == [1, 1, 1, 1]
    assert [v.version for v in registry.versions("same")] == [1]


class _CrashOnRecord:
    """A store that dies right after the blob is written, before the version record."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def create(self, key: str, data: bytes) -> bool:
        if "/versions/" in key:
            raise KeyboardInterrupt("simulated crash")
        return self.inner.create(key, data)


def test_crash_mid_write_leaves_no_visible_version(
    store: Store, base_identity: BaseIdentity, kohya_bytes: bytes
) -> None:
    crashing = Registry(_CrashOnRecord(store), base_identity)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        crashing.register(kohya_bytes, "crash")
    assert any(k.startswith("blobs/") for k in store.list())  # the blob was written first…
    registry = Registry(store, base_identity)
    assert registry.versions("crash") == [] and registry.list() == []  # …but no version is visible
    with pytest.raises(AdapterNotFound):
        registry.resolve("crash")
    assert registry.register(kohya_bytes, "crash").version == 1


def test_register_accepts_paths_and_needs_a_base(
    store: Store, base_identity: BaseIdentity, kohya_bytes: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "in.safetensors"
    path.write_bytes(kohya_bytes)
    assert Registry(store, base_identity).register(path, "from-path").version == 1
    with pytest.raises(ConfigError):
        Registry(store).register(path, "no-base")


class _RivalBeforeCreate:
    """Lets a rival registration take the next number between our listing and our create."""

    def __init__(self, inner: Store, rival: Registry, rival_bytes: bytes) -> None:
        self.inner = inner
        self.rival = rival
        self.rival_bytes = rival_bytes
        self.conflicts = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def create(self, key: str, data: bytes) -> bool:
        if "/versions/" in key and self.conflicts == 0:
            self.conflicts += 1
            self.rival.register(self.rival_bytes, "contended", {"title": "rival"})
        created = self.inner.create(key, data)
        return created


def test_losing_the_race_for_a_number_takes_the_next_one(
    store: Store, base_identity: BaseIdentity, kohya_bytes: bytes
) -> None:
    rival = Registry(store, base_identity)
    racing_store = _RivalBeforeCreate(store, rival, kohya_bytes)
    ours = Registry(racing_store, base_identity)  # type: ignore[arg-type]
    version = ours.register(kohya_bytes, "contended", {"title": "ours"})
    assert racing_store.conflicts == 1
    assert version.version == 2
    assert rival.open("contended@1").metadata.title == "rival"
    assert rival.open("contended@2").metadata.title == "ours"
    blobs = [k for k in store.list() if k.startswith("blobs/")]
    assert len(blobs) == 2  # the loser's blob for number 1 was removed


def test_open_data_for_a_cache_tier(registry: Registry, kohya_bytes: bytes) -> None:
    """read_blob + open_data: the server's disk cache re-opens bytes it verified before."""
    version = registry.register(kohya_bytes, "cached")
    data = registry.read_blob(version)
    assert registry.open_data(version, data).tensors.keys() == registry.open(version).tensors.keys()
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    with pytest.raises(AdapterCorrupt):
        registry.open_data(version, bytes(tampered))
    skipped = registry.open_data(version, bytes(tampered), verify=False)  # other checks still run
    assert skipped.version == version
    nan = bytearray(data)
    nan[-4:] = b"\x00\x00\xc0\x7f"  # float32 NaN in the last tensor
    with pytest.raises(AdapterInvalid) as err:
        registry.open_data(version, bytes(nan), verify=False)
    assert err.value.reason == "non_finite"
