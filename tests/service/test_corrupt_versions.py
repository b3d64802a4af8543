"""A stored version whose bytes fail their recorded hash serves nothing (issue 20, left open).

Over HTTP the answer is a typed ``adapter_corrupt`` naming the version (not a bare 500), counted in
``loraswap_adapter_corrupt_total``; ``loraswap adapters verify`` reports it. With a remote store, a disk
tier copy that fails its hash is dropped and fetched again from the store. Records carry a BLAKE3 that
each load verifies; records written before it (sha256 only) still open, verified by their sha256.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.errors import AdapterCorrupt
from adapters.identity import BaseIdentity
from adapters.records import blob_key, version_key
from adapters.registry import Registry
from adapters.sources import LocalStore
from adapters.views import blake3_hex
from service.cli import main
from tests.adapters.conftest import base_identity, lora_case, moto_endpoint, s3_bucket, save_bytes  # noqa: F401
from tests.adapters.factory import LoraCase, diffusers_layout
from tests.service.conftest import RunningServer, metric_value, start_server  # noqa: F401 (fixtures)

GENERATE = {"prompt": "x", "steps": 1, "width": 32, "height": 32, "adapters": [{"id": "style"}]}


@pytest.fixture(scope="module")
def adapter_bytes(lora_case: LoraCase) -> bytes:
    return save_bytes(diffusers_layout(lora_case))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: the header still parses
    path.write_bytes(bytes(data))


def register(http: httpx.Client, data: bytes) -> dict[str, Any]:
    files = {"file": ("style.safetensors", data, "application/octet-stream")}
    response = http.post("/v1/adapters", files=files, data={"id": "style"})
    assert response.status_code == 201, response.text
    return dict(response.json())


def assert_corrupt(response: httpx.Response) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "adapter_corrupt"
    assert error["detail"]["reason"] == "sha256_mismatch"
    assert (error["detail"]["adapter_id"], error["detail"]["version"]) == ("style", 1)
    assert error["message"].startswith("style@1 is corrupt") and "nothing is served" in error["message"]
    assert "adapters verify" in error["hint"]


def test_a_corrupt_local_version_is_typed_counted_and_reported(
    start_server: Callable[..., RunningServer],
    tmp_path: Path,
    adapter_bytes: bytes,
    loraswap_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"
    server = start_server(store=str(store))
    with server.client() as http:
        record = register(http, adapter_bytes)
        assert record["blake3"] == blake3_hex((store / blob_key(record["sha256"])).read_bytes())
        flip_last_byte(store / blob_key(record["sha256"]))
        assert_corrupt(http.post("/v1/adapters/style/preload"))
        assert_corrupt(http.post("/v1/generate", json=GENERATE))
        assert http.get("/v1/adapters/style").status_code == 200  # the record itself is fine
    corrupt = metric_value(
        server.url, "loraswap_adapter_corrupt_total", tier="store", reason="sha256_mismatch"
    )
    assert corrupt == 2
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{store}")
    assert main(["adapters", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"sha256_mismatch: blobs/sha256/{record['sha256']}.safetensors: style@1" in out


def test_a_corrupt_disk_tier_copy_is_fetched_again_and_a_corrupt_s3_blob_is_refused(
    start_server: Callable[..., RunningServer],
    tmp_path: Path,
    adapter_bytes: bytes,
    moto_endpoint: str,
    s3_bucket: str,
) -> None:
    import boto3

    server = start_server(store=f"s3://{s3_bucket}/loras", s3_endpoint_url=moto_endpoint)
    app: Any = server.server.config.app
    cache = app.state.runtime.adapters.cache
    with server.client() as http:
        record = register(http, adapter_bytes)
        assert http.post("/v1/adapters/style/preload").status_code == 200  # store → disk tier
        cache.drop(lambda _key: True)
        copy = cache.disk.path(record["sha256"])
        flip_last_byte(copy)
        assert http.post("/v1/adapters/style/preload").status_code == 200  # the store's bytes, again
        assert blake3_hex(copy.read_bytes()) == record["blake3"]  # the copy was replaced
        assert metric_value(server.url, "loraswap_adapter_corrupt_total", tier="disk") == 1
        s3 = boto3.client("s3", endpoint_url=moto_endpoint)
        key = f"loras/{blob_key(record['sha256'])}"
        data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        data[-1] ^= 0x01
        s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
        cache.drop(lambda _key: True)
        copy.unlink()
        cache.disk.entries, cache.disk.nbytes = 0, 0
        assert_corrupt(http.post("/v1/adapters/style/preload"))
        assert not copy.exists()  # nothing from the corrupt blob is cached either
    assert metric_value(server.url, "loraswap_adapter_corrupt_total", tier="store") == 1


def test_records_without_blake3_verify_by_sha256(
    base_identity: BaseIdentity, adapter_bytes: bytes, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    registry = Registry(store, base_identity)
    version = registry.register(adapter_bytes, "style")
    assert version.blake3 is not None
    legacy = json.loads(store.get(version_key("style", 1)))
    del legacy["blake3"]  # as releases before BLAKE3 wrote it
    store.put(version_key("style", 1), json.dumps(legacy).encode())
    old = registry.resolve("style")
    assert old.blake3 is None and old.record_json() == json.dumps(legacy, separators=(",", ":")).encode()
    assert registry.open(old).tensors  # verified by its sha256
    flip_last_byte(tmp_path / "store" / blob_key(old.sha256))
    with pytest.raises(AdapterCorrupt) as err:
        registry.open(old)
    assert err.value.detail["algorithm"] == "sha256" and err.value.reason == "sha256_mismatch"
    with pytest.raises(AdapterCorrupt) as err:
        registry.open(version)
    assert err.value.detail["algorithm"] == "blake3"
