"""Bytes that are not safetensors say what they look like, before any size check (issue 20, defect 1).

An HTML page saved as ``.safetensors`` (the usual failed download) or a renamed image used to be read as
a header length of ~10¹⁸ bytes and answered ``413 adapter_too_large``. Each kind is sniffed from its
first bytes: in the reader, over HTTP (``POST /v1/adapters``, upload and ``s3://`` source) and from the
CLI (``register``, ``inspect``, ``convert``).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.errors import AdapterInvalid, AdapterNotSafetensors, AdapterTooLarge, AdapterUnsafeFormat
from adapters.format import Limits, read_adapter
from adapters.sniff import looks_like
from service.cli import main
from tests.adapters.conftest import moto_endpoint, s3_bucket  # noqa: F401 (fixtures)
from tests.service.conftest import RunningServer, start_server  # noqa: F401 (fixtures)

HTML = b"\xef\xbb\xbf\n  <!DOCTYPE html>\n<html><head><title>Sign in</title></head>" + b"<p>x</p>" * 600


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    return buffer.getvalue()


# kind → bytes; padded past the small limit the tests set, so a size check first would answer 413.
SAMPLES: dict[str, bytes] = {
    "html": HTML,
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(4000),
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(4000),
    "webp": b"RIFF\x24\x10\x00\x00WEBPVP8 " + bytes(4000),
    "gzip": gzip.compress(b"{}" * 3000, mtime=0),  # mtime 0: its first 8 bytes are a plausible length
    "json": json.dumps({"error": "not found", "pad": "x" * 4000}).encode(),
    "empty": b"",
}
UNSAFE: dict[str, bytes] = {
    "zip": _zip() + bytes(4000),
    "pickle": pickle.dumps({"w": list(range(2000))}, protocol=4),
}
SMALL = Limits(max_bytes=1024, max_header_bytes=256)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_kind_is_named_before_the_size_check(kind: str, tmp_path: Path) -> None:
    data = SAMPLES[kind]
    assert looks_like(data[:64])[0] == kind
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(AdapterNotSafetensors) as err:
            read_adapter(source, limits=SMALL)
        assert err.value.detail["looks_like"] == kind
        assert err.value.reason == ("truncated" if kind == "empty" else "not_safetensors")
        assert "not a safetensors file" in err.value.message
        assert isinstance(err.value, AdapterInvalid)  # 422, like every other invalid file


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_zip_and_pickle_checkpoints_are_named_and_refused_unopened(kind: str) -> None:
    with pytest.raises(AdapterUnsafeFormat) as err:
        read_adapter(UNSAFE[kind], limits=SMALL)
    assert err.value.detail["looks_like"] == kind and err.value.reason == "pickle"


def test_a_header_length_past_the_end_of_the_file_is_truncated_not_too_large() -> None:
    data = (5_000_000).to_bytes(8, "little") + b'{"a": 1}' + bytes(100)  # plausible length, short file
    with pytest.raises(AdapterInvalid) as err:
        read_adapter(data, limits=SMALL)
    assert not isinstance(err.value, AdapterTooLarge)
    assert err.value.reason == "truncated"
    assert err.value.message.startswith("not a safetensors file, or truncated")


def upload(server: RunningServer, data: bytes) -> tuple[int, dict[str, object]]:
    with server.client() as http:
        files = {"file": ("model.safetensors", data, "application/octet-stream")}
        response = http.post("/v1/adapters", files=files, data={"id": "junk"})
        assert http.get("/v1/adapters").json() == {"adapters": []}
    return response.status_code, response.json()["error"]


def test_http_upload_names_what_the_bytes_are(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server(store=str(tmp_path / "store"), max_adapter_bytes=1024)
    big_html = HTML * 40  # 190 KB: over the 1 KiB limit, and more than one block of the stream
    for kind, data in (("html", big_html), ("png", SAMPLES["png"]), ("empty", b"")):
        status, error = upload(server, data)
        assert status == 422, (kind, error)
        assert error["type"] == "adapter_not_safetensors", (kind, error)
        assert error["detail"]["looks_like"] == kind  # type: ignore[index]
    status, error = upload(server, UNSAFE["zip"])
    assert status == 422 and error["type"] == "adapter_unsafe_format"
    cut = (5_000_000).to_bytes(8, "little") + b'{"a": 1}' + bytes(100)
    status, error = upload(server, cut)
    assert status == 422 and error["detail"]["reason"] == "truncated"  # type: ignore[index]


def test_s3_source_is_sniffed_before_its_size(
    start_server: Callable[..., RunningServer], tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="login.safetensors", Body=HTML * 40)
    s3.put_object(Bucket=s3_bucket, Key="empty.safetensors", Body=b"")
    server = start_server(
        store=str(tmp_path / "store"), s3_endpoint_url=moto_endpoint, max_adapter_bytes=1024
    )
    with server.client() as http:
        for key, kind in (("login", "html"), ("empty", "empty")):
            body = {"id": "junk", "source": f"s3://{s3_bucket}/{key}.safetensors"}
            response = http.post("/v1/adapters", json=body)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["type"] == "adapter_not_safetensors"
            assert response.json()["error"]["detail"]["looks_like"] == kind


def test_cli_register_inspect_and_convert_name_the_bytes(
    loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("LORASWAP_MAX_ADAPTER_BYTES", "1024")
    page = tmp_path / "lora.safetensors"
    page.write_bytes(HTML * 40)
    out = str(tmp_path / "out.safetensors")
    for argv in (
        ["register", str(page), "--id", "junk"],
        ["inspect", str(page)],
        ["convert", str(page), "--to", "kohya", "-o", out],
    ):
        code = main(["adapters", *argv])
        _, err = capsys.readouterr()
        assert code == 2, argv
        assert "error[adapter_not_safetensors]" in err and "HTML page" in err, err
        assert "too large" not in err and "Traceback" not in err
