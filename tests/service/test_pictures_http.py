"""Adapter pictures over real HTTP (local and S3 stores), ``GET /v1/server`` and the console's headers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.adapters.conftest import moto_endpoint, s3_bucket, save_bytes  # noqa: F401 (fixtures)
from tests.adapters.factory import diffusers_layout, make_case

ADMIN = "a" * 24
GEN = "g" * 24


def image(fmt: str, size: tuple[int, int] = (24, 16), color: str = "orange") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def adapter_bytes(base_model: Any) -> bytes:
    return save_bytes(diffusers_layout(make_case(base_model.pipe)))


@pytest.fixture(params=["local", "s3"])
def picture_server(request: pytest.FixtureRequest, start_server: Any, tmp_path: Path) -> Any:
    store = str(tmp_path / "store")
    extra: dict[str, Any] = {}
    if request.param == "s3":
        extra["s3_endpoint_url"] = request.getfixturevalue("moto_endpoint")
        store = f"s3://{request.getfixturevalue('s3_bucket')}/adapters"
    return start_server(
        store=store,
        admin_tokens=[ADMIN],
        generate_tokens=[GEN],
        max_pictures=3,
        max_picture_bytes=8000,
        **extra,
    )


def register(http: httpx.Client, data: bytes, adapter_id: str, pictures: list[tuple[str, str, bytes]]) -> Any:
    files: list[tuple[str, Any]] = [("file", ("a.safetensors", data)), ("id", (None, adapter_id))]
    files += [(part, (name, content)) for part, name, content in pictures]
    return http.post("/v1/adapters", files=files, headers={"Authorization": f"Bearer {ADMIN}"})


def test_pictures_registered_listed_and_served(picture_server: Any, adapter_bytes: bytes) -> None:
    png, webp = image("PNG"), image("WEBP", (8, 8))
    with picture_server.client() as http:
        created = register(
            http,
            adapter_bytes,
            "pictured",
            [("loss_curve", "loss.png", png), ("picture", "cover.webp", webp), ("samples", "g.png", png)],
        )
        assert created.status_code == 201, created.text
        roles = [(p["role"], p["name"], p["media_type"]) for p in created.json()["pictures"]]
        assert roles == [
            ("loss_curve", "loss.png", "image/png"),
            ("preview", "cover.webp", "image/webp"),
            ("samples", "g.png", "image/png"),
        ]
        gen = {"Authorization": f"Bearer {GEN}"}
        shown = http.get("/v1/adapters/pictured/versions/1", headers=gen).json()
        assert [p["role"] for p in shown["pictures"]] == ["loss_curve", "preview", "samples"]
        served = http.get("/v1/adapters/pictured/versions/1/pictures/1", headers=gen)
        assert served.status_code == 200 and served.content == webp
        assert served.headers["content-type"] == "image/webp"
        assert served.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in served.headers["content-security-policy"]
        assert http.get("/v1/adapters/pictured/versions/1/pictures/0").status_code == 401
        missing = http.get("/v1/adapters/pictured/versions/1/pictures/3", headers=gen)
        assert missing.status_code == 404 and missing.json()["error"]["detail"]["reason"] == "unknown_picture"
        # a version without pictures shows none
        plain = register(http, adapter_bytes, "plain", [])
        assert plain.status_code == 201 and plain.json()["pictures"] == []
        assert http.get("/v1/adapters/plain/versions/1/pictures/0", headers=gen).status_code == 404


def test_pictures_are_bounded_and_checked(start_server: Any, tmp_path: Path, adapter_bytes: bytes) -> None:
    server = start_server(
        store=str(tmp_path / "store"), admin_tokens=[ADMIN], max_pictures=2, max_picture_bytes=8000
    )
    big = Image.effect_noise((200, 200), 80).convert("RGB")
    out = io.BytesIO()
    big.save(out, format="PNG")
    cases = [
        ([("picture", "x.png", b"<svg onload=alert(1)>")], "image_invalid"),
        ([("picture", "x.gif", image("GIF"))], "image_invalid"),
        ([("picture", "big.png", out.getvalue())], "image_too_large"),
        ([("picture", f"{i}.png", image("PNG")) for i in range(3)], "validation_error"),
    ]
    with server.client() as http:
        for pictures, error in cases:
            answer = register(http, adapter_bytes, "bounded", pictures)
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["type"] == error
        plain = register(http, adapter_bytes, "bounded", [])
        assert plain.status_code == 201
        listed = http.get("/v1/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert [a["adapter_id"] for a in listed["adapters"]] == ["bounded"]


def test_server_status_and_console_headers(start_server: Any, tmp_path: Path) -> None:
    server = start_server(store=str(tmp_path / "store"), admin_tokens=[ADMIN], generate_tokens=[GEN])
    with server.client() as http:
        assert http.get("/v1/server").status_code == 401
        body = http.get("/v1/server", headers={"Authorization": f"Bearer {GEN}"}).json()
        assert body["ready"] is True and body["scopes"] == ["generate"]
        assert "ddim" in body["schedulers"] and body["model"]["native_size"] == 32
        assert body["queue"]["depth"] == 0 and set(body["cache"]) == {"device", "host", "disk"}
        admin = http.get("/v1/server", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert admin["scopes"] == ["admin", "generate"]
        generated = http.post(
            "/v1/generate",
            json={"prompt": "x", "steps": 2, "seed": 1},
            headers={"Authorization": f"Bearer {GEN}"},
        )
        assert generated.status_code == 200
        recent = http.get("/v1/server", headers={"Authorization": f"Bearer {GEN}"}).json()["recent"]
        assert recent[0]["outcome"] == "succeeded" and recent[0]["steps"] == 2
        assert recent[0]["timings"]["denoise_s"] > 0 and "prompt" not in recent[0]

        page = http.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp
        for name, media in [("console.js", "text/javascript"), ("console.css", "text/css")]:
            served = http.get(f"/ui/{name}")
            assert served.status_code == 200 and served.headers["content-type"].startswith(media)
        assert http.get("/ui/..%2Fapp.py").status_code == 404
        assert http.get("/ui/app.py").status_code == 404
