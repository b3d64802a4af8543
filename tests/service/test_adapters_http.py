"""The adapter registry over real HTTP: upload, list, show, dedup, delete, S3 sources, preload, generate."""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.adapters.conftest import moto_endpoint, s3_bucket, save_bytes  # noqa: F401 (fixtures)
from tests.adapters.factory import LoraCase, diffusers_layout, kohya_layout, make_case

GEN = "g" * 24
ADMIN = "a" * 24


SAFETENSORS_START = (2).to_bytes(8, "little") + b"{}"  # a plausible start: only the size can refuse it


@pytest.fixture(scope="module")
def case(base_model: Any) -> LoraCase:
    return make_case(base_model.pipe)


@pytest.fixture(scope="module")
def adapter_bytes(case: LoraCase) -> bytes:
    return save_bytes(diffusers_layout(case))


@pytest.fixture(scope="module")
def other_bytes(case: LoraCase) -> bytes:
    """Different content: every tensor doubled."""
    return save_bytes({k: v * 2 for k, v in diffusers_layout(case).items()})


@pytest.fixture
def registry_server(start_server: Any, tmp_path: Path) -> Any:
    return start_server(store=str(tmp_path / "store"))


def upload(
    http: httpx.Client,
    data: bytes,
    adapter_id: str,
    *,
    filename: str = "style.safetensors",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> httpx.Response:
    return http.post(
        "/v1/adapters",
        files={"file": (filename, data, "application/octet-stream")},
        data={"id": adapter_id, **fields},
        headers=headers,
    )


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def pixels(response: httpx.Response) -> np.ndarray:
    png = base64.b64decode(response.json()["images"][0]["png_base64"])
    return np.asarray(Image.open(io.BytesIO(png)))


def runtime_of(server: Any) -> Any:
    return server.server.config.app.state.runtime


def blobs(store: Path) -> list[Path]:
    return list((store / "blobs").rglob("*.safetensors")) if (store / "blobs").exists() else []


# -- registration, listing, dedup ------------------------------------------------------------------


def test_upload_list_show_dedup_and_new_version(
    registry_server: Any, adapter_bytes: bytes, other_bytes: bytes
) -> None:
    with registry_server.client() as http:
        first = upload(
            http, adapter_bytes, "style", metadata='{"trigger_words": ["wtrclr"]}', scale_default="0.7"
        )
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["created"] is True
        assert body["ref"] == "style@1"
        assert body["version"] == 1
        assert body["scale_default"] == 0.7
        assert body["source_format"] == "diffusers"
        assert first.headers["location"] == "/v1/adapters/style/versions/1"

        listing = http.get("/v1/adapters").json()["adapters"]
        assert [(a["adapter_id"], a["latest"]["version"], a["versions"]) for a in listing] == [
            ("style", 1, 1)
        ]

        shown = http.get("/v1/adapters/style").json()
        assert shown["latest"]["ref"] == "style@1"
        assert [v["version"] for v in shown["versions"]] == [1]

        one = http.get("/v1/adapters/style/versions/1")
        assert one.status_code == 200, one.text
        assert one.json()["sha256"] == body["sha256"]
        assert one.json()["metadata"]["trigger_words"] == ["wtrclr"]
        assert one.json()["metadata"]["adapter_id"] == "style"

        again = upload(
            http, adapter_bytes, "style", metadata='{"trigger_words": ["wtrclr"]}', scale_default="0.7"
        )
        assert again.status_code == 200, again.text
        assert again.json()["created"] is False
        assert again.json()["version"] == 1

        second = upload(http, other_bytes, "style")
        assert second.status_code == 201, second.text
        assert second.json()["version"] == 2
        assert http.get("/v1/adapters/style").json()["latest"]["version"] == 2

        registrations = "loraswap_adapter_registrations_total"
        assert metric(http, registrations, outcome="created") == 2
        assert metric(http, registrations, outcome="existing") == 1


def test_kohya_upload_is_normalised(registry_server: Any, case: LoraCase) -> None:
    with registry_server.client() as http:
        response = upload(http, save_bytes(kohya_layout(case)), "kohya-style")
    assert response.status_code == 201, response.text
    assert response.json()["source_format"] == "kohya"
    assert response.json()["components"] == ["text_encoder", "unet"]


def test_form_fields_are_validated_and_spool_files_removed(
    registry_server: Any, adapter_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where the server spools uploads
    with registry_server.client() as http:
        bad_json = upload(http, adapter_bytes, "style", metadata="{not json")
        bad_scale = upload(http, adapter_bytes, "style", scale_default="lots")
        no_id = http.post("/v1/adapters", files={"file": ("a.safetensors", adapter_bytes)})
        no_file = http.post("/v1/adapters", data={"id": "style"}, files={"other": ("x", b"1")})
        text = http.post("/v1/adapters", content=b"hello", headers={"content-type": "text/plain"})
        two_files = http.post(
            "/v1/adapters",
            files=[("file", ("a.safetensors", adapter_bytes)), ("file", ("b.safetensors", adapter_bytes))],
            data={"id": "style"},
        )
        cut = http.build_request(
            "POST", "/v1/adapters", files={"file": ("a.safetensors", adapter_bytes)}, data={"id": "style"}
        )
        cut.read()
        truncated = http.post(
            "/v1/adapters", content=cut.content[:-200], headers={"content-type": cut.headers["content-type"]}
        )
        listed = http.get("/v1/adapters").json()
    assert bad_json.status_code == 422
    assert bad_json.json()["error"]["detail"]["reason"] == "bad_metadata"
    assert bad_scale.status_code == 422
    assert bad_scale.json()["error"]["detail"]["field"] == "scale_default"
    assert no_id.status_code == 422
    assert no_file.status_code == 422
    assert text.status_code == 422
    assert two_files.status_code == 422
    assert two_files.json()["error"]["detail"]["field"] == "file"
    assert truncated.status_code == 422
    assert listed == {"adapters": []}
    assert list(spool.iterdir()) == []


def test_garbage_and_pickle_are_refused_and_nothing_is_stored(start_server: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = start_server(store=str(store))
    pickled = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, pickled)
    with server.client() as http:
        garbage = upload(http, b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}", "junk")
        pickle = upload(http, pickled.getvalue(), "junk")
        by_name = upload(http, b"anything", "junk", filename="model.ckpt")
        assert garbage.status_code == 422
        assert garbage.json()["error"]["type"] == "adapter_invalid"
        for response in (pickle, by_name):
            assert response.status_code == 422
            assert response.json()["error"]["type"] == "adapter_unsafe_format"
            assert response.json()["error"]["detail"]["reason"] == "pickle"
        assert http.get("/v1/adapters").json() == {"adapters": []}
        assert metric(http, "loraswap_adapter_registrations_total", outcome="rejected") == 3
    assert blobs(store) == []


def test_upload_over_max_adapter_bytes_is_413(
    start_server: Any, tmp_path: Path, adapter_bytes: bytes
) -> None:
    store = tmp_path / "store"
    server = start_server(store=str(store), max_adapter_bytes=64 << 10)
    assert len(adapter_bytes) > 64 << 10
    with server.client() as http:
        announced = upload(http, adapter_bytes, "big")
        # the same form streamed with chunked encoding: no Content-Length to check up front
        encoded = http.build_request(
            "POST", "/v1/adapters", files={"file": ("a.safetensors", adapter_bytes)}, data={"id": "big"}
        )
        encoded.read()
        streamed = http.post(
            "/v1/adapters",
            content=iter([encoded.content[i : i + 8192] for i in range(0, len(encoded.content), 8192)]),
            headers={"content-type": encoded.headers["content-type"]},
        )
        way_over = upload(http, SAFETENSORS_START + b"\x00" * (400 << 10), "big")  # refused on Content-Length
        still_up = http.get("/v1/adapters")
    for response in (announced, streamed, way_over):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] == "adapter_too_large"
    assert still_up.json() == {"adapters": []}
    assert blobs(store) == []


def test_upload_larger_than_the_json_body_limit_reaches_the_validator(registry_server: Any) -> None:
    """The app-wide 1 MiB JSON limit does not apply to uploads: an 8 MiB file is read and validated."""
    junk = SAFETENSORS_START + b"\x00" * (8 << 20)  # starts like safetensors (issue 20: sniffed first)
    with registry_server.client() as http:
        response = upload(http, junk, "junk")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "adapter_invalid"


# -- errors and auth ----------------------------------------------------------------------------------


def test_bad_ids_are_422_and_unknown_ids_404(registry_server: Any, adapter_bytes: bytes) -> None:
    with registry_server.client() as http:
        bad_upload = upload(http, adapter_bytes, "Bad Id!")
        traversal = upload(http, adapter_bytes, "..")
        bad_get = http.get("/v1/adapters/UPPER")
        unknown = http.get("/v1/adapters/nope")
        unknown_version = http.get("/v1/adapters/nope/versions/1")
        unknown_delete = http.delete("/v1/adapters/nope")
        unknown_preload = http.post("/v1/adapters/nope/preload")
        assert upload(http, adapter_bytes, "style").status_code == 201
        missing_version = http.get("/v1/adapters/style/versions/9")
        zero = http.get("/v1/adapters/style/versions/0")
        ref_as_id = http.delete("/v1/adapters/style@1")  # a version is chosen in the path, not the id
        ref_preload = http.post("/v1/adapters/style@1/preload")
    for response in (bad_upload, traversal, bad_get, zero, ref_as_id, ref_preload):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] == "adapter_ref_invalid"
    for response in (unknown, unknown_version, unknown_delete, unknown_preload, missing_version):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "adapter_not_found"
    assert missing_version.json()["error"]["detail"]["reason"] == "unknown_version"


def test_scopes_admin_writes_generate_reads(start_server: Any, tmp_path: Path, adapter_bytes: bytes) -> None:
    server = start_server(store=str(tmp_path / "store"), generate_tokens=[GEN], admin_tokens=[ADMIN])
    gen = {"Authorization": f"Bearer {GEN}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with server.client() as http:
        anonymous = upload(http, adapter_bytes, "style")
        as_generate = upload(http, adapter_bytes, "style", headers=gen)
        as_admin = upload(http, adapter_bytes, "style", headers=admin)
        anonymous_list = http.get("/v1/adapters")
        listed = http.get("/v1/adapters", headers=gen)
        shown = http.get("/v1/adapters/style/versions/1", headers=gen)
        delete_as_generate = http.delete("/v1/adapters/style", headers=gen)
        preload_as_generate = http.post("/v1/adapters/style/preload", headers=gen)
        delete_as_admin = http.delete("/v1/adapters/style/versions/1", headers=admin)
    assert anonymous.status_code == 401
    assert anonymous_list.status_code == 401
    for response in (as_generate, delete_as_generate, preload_as_generate):
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "forbidden"
    assert as_admin.status_code == 201
    assert listed.status_code == 200
    assert listed.json()["adapters"][0]["adapter_id"] == "style"
    assert shown.status_code == 200
    assert delete_as_admin.status_code == 200


def test_not_ready_is_503(start_server: Any, tmp_path: Path, base_model: Any) -> None:
    release = threading.Event()

    def slow_loader(_: Any) -> Any:
        release.wait(30)
        return base_model

    server = start_server(loader=slow_loader, wait=False, store=str(tmp_path / "store"))
    try:
        with server.client() as http:
            listing = http.get("/v1/adapters")
            posting = upload(http, b"x", "style")
        assert listing.status_code == 503
        assert listing.json()["error"]["type"] == "not_ready"
        assert posting.status_code == 503
    finally:
        release.set()
        server.wait_ready()


def test_failing_store_is_503(start_server: Any, moto_endpoint: str) -> None:
    server = start_server(store="s3://no-such-bucket/adapters", s3_endpoint_url=moto_endpoint)
    with server.client() as http:
        response = http.get("/v1/adapters")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "adapter_store_error"


# -- deletion ---------------------------------------------------------------------------------------


def test_delete_tombstones_and_numbers_are_not_reused(
    registry_server: Any, adapter_bytes: bytes, other_bytes: bytes
) -> None:
    with registry_server.client() as http:
        assert upload(http, adapter_bytes, "style").json()["version"] == 1
        assert upload(http, other_bytes, "style").json()["version"] == 2
        deleted = http.delete("/v1/adapters/style/versions/2")
        assert deleted.status_code == 200, deleted.text
        assert [(v["ref"], v["deleted"]) for v in deleted.json()["deleted"]] == [("style@2", True)]
        assert http.get("/v1/adapters/style/versions/2").status_code == 404
        assert http.get("/v1/adapters/style").json()["latest"]["version"] == 1
        assert http.delete("/v1/adapters/style/versions/2").status_code == 404

        again = upload(http, other_bytes, "style")  # the deleted content comes back as a new number
        assert again.status_code == 201
        assert again.json()["version"] == 3

        everything = http.delete("/v1/adapters/style")
        assert everything.status_code == 200
        assert sorted(v["version"] for v in everything.json()["deleted"]) == [1, 3]
        gone = http.get("/v1/adapters/style")
        assert gone.status_code == 404
        assert gone.json()["error"]["detail"]["reason"] == "deleted"
        assert http.get("/v1/adapters").json() == {"adapters": []}
        assert (
            http.get("/v1/adapters", params={"include_deleted": True}).json()["adapters"][0]["deleted"] == 3
        )


# -- S3 sources ----------------------------------------------------------------------------------------


@pytest.fixture
def s3_server(start_server: Any, tmp_path: Path, moto_endpoint: str) -> Iterator[Any]:
    yield start_server(
        store=str(tmp_path / "store"), s3_endpoint_url=moto_endpoint, max_adapter_bytes=1 << 20
    )


def test_register_from_s3_source(
    s3_server: Any,
    moto_endpoint: str,
    s3_bucket: str,
    adapter_bytes: bytes,
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="loras/style.safetensors", Body=adapter_bytes)
    s3.put_object(
        Bucket=s3_bucket, Key="loras/huge.safetensors", Body=SAFETENSORS_START + b"\x00" * (1 << 20)
    )
    source = f"s3://{s3_bucket}/loras/style.safetensors"
    with s3_server.client() as http:
        created = http.post("/v1/adapters", json={"id": "from-s3", "source": source, "scale_default": 0.5})
        existing = http.post("/v1/adapters", json={"id": "from-s3", "source": source, "scale_default": 0.5})
        huge = http.post(
            "/v1/adapters", json={"id": "huge", "source": f"s3://{s3_bucket}/loras/huge.safetensors"}
        )
        missing = http.post("/v1/adapters", json={"id": "x", "source": f"s3://{s3_bucket}/loras/nope"})
        refused = [
            http.post("/v1/adapters", json={"id": "x", "source": uri})
            for uri in ("http://169.254.169.254/latest", "file:///etc/passwd", "s3://", f"s3://{s3_bucket}")
        ]
        extra = http.post("/v1/adapters", json={"id": "x", "source": source, "url": "y"})
        not_json = http.post("/v1/adapters", content=b"{", headers={"content-type": "application/json"})
    assert created.status_code == 201, created.text
    assert created.json()["scale_default"] == 0.5
    assert existing.status_code == 200
    assert existing.json()["created"] is False
    assert huge.status_code == 413
    assert huge.json()["error"]["type"] == "adapter_too_large"
    assert missing.status_code == 422
    assert missing.json()["error"]["detail"]["reason"] == "source_unreadable"
    for response in refused:
        assert response.status_code == 422
        assert response.json()["error"]["detail"]["reason"] == "bad_source"
    assert extra.status_code == 422
    assert not_json.status_code == 422


def test_s3_store_version_metadata_reads_only_the_header(
    start_server: Any,
    moto_endpoint: str,
    s3_bucket: str,
    adapter_bytes: bytes,
) -> None:
    server = start_server(store=f"s3://{s3_bucket}/team", s3_endpoint_url=moto_endpoint)
    with server.client() as http:
        created = upload(http, adapter_bytes, "remote", metadata='{"title": "Remote style"}')
        assert created.status_code == 201, created.text
        one = http.get("/v1/adapters/remote/versions/1")
        listed = http.get("/v1/adapters").json()["adapters"]
        styled = http.post("/v1/generate", json={"prompt": "a", "steps": 1, "adapters": [{"id": "remote"}]})
    assert one.status_code == 200, one.text
    assert one.json()["metadata"]["title"] == "Remote style"
    assert one.json()["metadata"]["rank"] == 4
    assert [a["adapter_id"] for a in listed] == ["remote"]
    assert styled.status_code == 200, styled.text


def test_openapi_documents_both_register_encodings(registry_server: Any) -> None:
    with registry_server.client() as http:
        schema = http.get("/schema/openapi.json").json()
    register = schema["paths"]["/v1/adapters"]["post"]
    assert set(register["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"get", "delete"} <= set(schema["paths"]["/v1/adapters/{adapter_id}/versions/{version}"])


# -- preload and generation ------------------------------------------------------------------------------


def test_preload_makes_the_adapter_device_resident(registry_server: Any, adapter_bytes: bytes) -> None:
    runtime = runtime_of(registry_server)
    with registry_server.client() as http:
        version = upload(http, adapter_bytes, "style").json()
        response = http.post("/v1/adapters/style/preload", params={"pin": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["ref"] == "style@1"
        assert body["pinned"] is True
        assert body["load_s"] >= 0
        assert ("style", 1, version["sha256"]) in runtime.adapters.cache.resident()
        assert metric(http, "loraswap_adapter_cache_entries", tier="device") >= 1
        by_body = http.post("/v1/adapters/style/preload", json={"version": 1})
        assert by_body.status_code == 200, by_body.text
        assert http.post("/v1/adapters/style/preload", params={"version": 2}).status_code == 404

        # deleting drops unpinned entries; a pinned one stays until the server stops
        assert http.delete("/v1/adapters/style").status_code == 200
    assert ("style", 1, version["sha256"]) in runtime.adapters.cache.resident()


def test_delete_drops_the_cached_version(registry_server: Any, adapter_bytes: bytes) -> None:
    runtime = runtime_of(registry_server)
    with registry_server.client() as http:
        version = upload(http, adapter_bytes, "style").json()
        assert http.post("/v1/adapters/style/preload").status_code == 200
        key = ("style", 1, version["sha256"])
        assert key in runtime.adapters.cache.resident()
        assert http.delete("/v1/adapters/style/versions/1").status_code == 200
    assert key not in runtime.adapters.cache.resident()


def test_generate_with_an_uploaded_adapter(
    registry_server: Any, adapter_bytes: bytes, other_bytes: bytes
) -> None:
    request = {"prompt": "a", "steps": 2, "seed": 5}
    with registry_server.client() as http:
        assert upload(http, adapter_bytes, "style").status_code == 201
        plain = http.post("/v1/generate", json=request)
        styled = http.post("/v1/generate", json={**request, "adapters": [{"id": "style"}]})
        assert styled.status_code == 200, styled.text
        assert styled.json()["adapters"][0]["version"] == 1
        assert (pixels(styled) != pixels(plain)).any()

        assert upload(http, other_bytes, "style").json()["version"] == 2
        latest = http.post("/v1/generate", json={**request, "adapters": [{"id": "style"}]})
        pinned = http.post("/v1/generate", json={**request, "adapters": [{"id": "style", "version": 1}]})
    assert latest.status_code == 200, latest.text
    assert latest.json()["adapters"][0]["version"] == 2
    assert pinned.json()["adapters"][0]["version"] == 1
    assert (pixels(pinned) == pixels(styled)).all()
    assert (pixels(latest) != pixels(styled)).any()
