"""The Store protocol, run against both backends, plus backend-specific safety checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.errors import StoreConfigError, StoreError
from adapters.sources import KeyMissing, LocalStore, Store, open_store


def test_put_get_list_delete(store: Store) -> None:
    assert isinstance(store, Store)
    assert store.list() == [] and not store.exists("a/b.json")
    store.put("a/b.json", b"1")
    store.put("a/b.json", b"2")  # replace
    store.put("a/c/d.json", b"3")
    store.put("z.json", b"4")
    assert store.get("a/b.json") == b"2"
    assert store.exists("a/b.json")
    assert store.list() == ["a/b.json", "a/c/d.json", "z.json"]
    assert store.list("a/") == ["a/b.json", "a/c/d.json"]
    assert store.list("nothing/") == []
    store.delete("a/b.json")
    store.delete("a/b.json")  # missing is fine
    with pytest.raises(KeyMissing):
        store.get("a/b.json")


def test_create_is_exclusive(store: Store) -> None:
    assert store.create("v/1.json", b"first") is True
    assert store.create("v/1.json", b"second") is False
    assert store.get("v/1.json") == b"first"


@pytest.mark.parametrize(
    "key", ["../x", "a/../../x", "/abs", "a//b", "a/./b", "", "a b", "a/b/", "..", "a\\b"]
)
def test_keys_are_validated(store: Store, key: str) -> None:
    with pytest.raises(StoreError):
        store.put(key, b"x")
    with pytest.raises(StoreError):
        store.get(key)


def test_list_prefix_must_be_a_folder(store: Store) -> None:
    with pytest.raises(StoreError):
        store.list("a")
    with pytest.raises(StoreError):
        store.list("../")


def test_local_store_refuses_paths_resolving_outside_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("s")
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "adapters").mkdir(parents=True)
    os.symlink(outside, tmp_path / "root" / "adapters" / "evil")
    with pytest.raises(StoreError) as err:
        store.get("adapters/evil/secret.json")
    assert err.value.reason == "bad_key"
    with pytest.raises(StoreError):
        store.create("adapters/evil/new.json", b"x")
    assert not (outside / "new.json").exists()


def test_local_store_hides_and_cleans_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("k/a.json", b"1")
    assert store.create("k/b.json", b"2")
    assert not store.create("k/b.json", b"3")
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["a.json", "b.json"]
    (tmp_path / "k" / ".tmp-leftover").write_bytes(b"crashed writer")
    assert store.list() == ["k/a.json", "k/b.json"]


def test_s3_conditional_write_is_refused_by_the_server(moto_endpoint: str, s3_bucket: str) -> None:
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_s3_store_keeps_to_its_prefix(moto_endpoint: str, s3_bucket: str) -> None:
    import boto3

    from adapters.sources.s3 import S3Store

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.put_object(Bucket=s3_bucket, Key="elsewhere/x.json", Body=b"no")
    store = open_store(f"s3://{s3_bucket}/team/lora", s3_endpoint_url=moto_endpoint)
    assert isinstance(store, S3Store) and store.uri == f"s3://{s3_bucket}/team/lora"
    store.put("a.json", b"yes")
    assert store.list() == ["a.json"]
    assert client.get_object(Bucket=s3_bucket, Key="team/lora/a.json")["Body"].read() == b"yes"


def test_s3_errors_are_store_errors(moto_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket/p", s3_endpoint_url=moto_endpoint)
    with pytest.raises(StoreError) as err:
        store.put("a.json", b"x")
    assert err.value.reason == "s3_error"


def test_open_store_uris(tmp_path: Path) -> None:
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}/x").uri == (tmp_path / "x").as_uri()  # type: ignore[union-attr]
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)
    assert isinstance(open_store(tmp_path), LocalStore)
    for bad in (
        "file://relative/dir",
        "ftp://host/x",
        "s3://",
        "s3:///prefix",
        "s3://Bad_Bucket/x",
        "s3://bucket/../x",
        "   ",
    ):
        with pytest.raises(StoreConfigError):
            open_store(bad)


def test_get_range_reads_a_slice(store: Store) -> None:
    store.put("blobs/x.bin", b"0123456789")
    assert store.get_range("blobs/x.bin", 0, 4) == b"0123"
    assert store.get_range("blobs/x.bin", 8, 100) == b"89"
    assert store.get_range("blobs/x.bin", 20, 30) == b""
    with pytest.raises(KeyMissing):
        store.get_range("blobs/missing.bin", 0, 4)
