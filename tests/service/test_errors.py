"""Every validation error is a 422 naming the field; other errors map to their documented status."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"width": 65}, "width"),
        ({"height": 4}, "height"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 9}, "num_images"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": -5}, "seed"),
        ({"scheduler": "bogus"}, "scheduler"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"colour": "red"}, "colour"),
        ({"adapters": [{"id": "../etc/passwd"}]}, "adapters"),
        ({"adapters": [{"id": "ok", "version": 0}]}, "adapters"),
    ],
)
def test_invalid_fields_are_422_and_named(server: Any, patch: dict[str, Any], field: str) -> None:
    with server.client() as http:
        response = http.post("/v1/generate", json={"prompt": "a cat", **patch})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    fields = [e["field"] for e in error["detail"]["errors"]]
    assert any(f.startswith(field) for f in fields), fields
    assert field in error["message"]


def test_missing_prompt_is_422(server: Any) -> None:
    with server.client() as http:
        response = http.post("/v1/generate", json={"steps": 2})
    assert response.status_code == 422
    assert "prompt" in response.json()["error"]["message"]


def test_malformed_json_is_422(server: Any) -> None:
    with server.client() as http:
        response = http.post(
            "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"


def test_server_limits_are_422(start_server: Any) -> None:
    server = start_server(max_width=32, max_steps=5, max_images=2)
    small = {"prompt": "a", "width": 32}
    with server.client() as http:
        too_wide = http.post("/v1/generate", json={"prompt": "a", "width": 64})
        too_long = http.post("/v1/generate", json={**small, "steps": 6})
        too_many = http.post("/v1/generate", json={**small, "num_images": 3, "steps": 1})
        fits = http.post("/v1/generate", json={**small, "num_images": 2, "steps": 1})
    assert fits.status_code == 200, fits.text
    for response, field in ((too_wide, "width"), (too_long, "steps"), (too_many, "num_images")):
        assert response.status_code == 422
        assert response.json()["error"]["detail"]["field"] == field


def test_body_over_limit_is_413(start_server: Any) -> None:
    server = start_server(max_body_bytes=2048)
    with server.client() as http:
        response = http.post("/v1/generate", json={"prompt": "x" * 3000})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


def test_unknown_adapter_is_404(server: Any) -> None:
    with server.client() as http:
        response = http.post("/v1/generate", json={"prompt": "a", "adapters": [{"id": "style"}]})
        tagged = http.post("/v1/generate", json={"prompt": "a <lora:style:0.5>"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "adapter_not_found"
    assert tagged.status_code == 404


def test_unknown_route_is_json_404(server: Any) -> None:
    with server.client() as http:
        response = http.get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_openapi_schema_lists_generate(server: Any) -> None:
    with server.client() as http:
        schema = http.get("/schema/openapi.json").json()
    assert "/v1/generate" in schema["paths"]


def test_unknown_fields_suggest_the_close_one(server: Any) -> None:
    """Issue 20, item 9: ``guidance`` → did you mean ``guidance_scale``; nested fields too."""
    body = {"prompt": "a", "guidance": 7, "adapters": [{"id": "x", "scal": 1}], "colour": "red"}
    with server.client() as http:
        response = http.post("/v1/generate", json=body)
        job = http.post("/v1/jobs", json={"prompt": "a", "setps": 3})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    problems = {p["field"]: p for p in error["detail"]["errors"]}
    assert problems["guidance"] == {
        "field": "guidance",
        "message": "unknown field; did you mean 'guidance_scale'?",
        "reason": "unknown_field",
        "suggestion": "guidance_scale",
    }
    assert problems["adapters.0.scal"]["suggestion"] == "scale"
    assert "suggestion" not in problems["colour"] and problems["colour"]["reason"] == "unknown_field"
    assert "guidance: unknown field; did you mean 'guidance_scale'?" in error["message"]
    assert job.status_code == 422
    assert job.json()["error"]["detail"]["errors"][0]["suggestion"] == "steps"
