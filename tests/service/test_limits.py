"""Request limits follow the loaded model (issue 20, item 2): a 512 px request on tiny-sd (native
32 px, 65,536 attention tokens) is refused at once instead of holding the worker for minutes."""

from __future__ import annotations

from typing import Any

NATIVE = 32  # tiny-sd


def error_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "limit_exceeded", error
    return error


def test_limits_follow_the_model_and_show_in_readyz(server: Any) -> None:
    with server.client() as http:
        limits = http.get("/readyz").json()["limits"]
        huge = http.post("/v1/generate", json={"prompt": "a", "width": 512, "height": 512, "steps": 4})
        many_pixels = http.post("/v1/generate", json={"prompt": "a", "width": 96, "height": 64})
        costly = http.post(
            "/v1/generate", json={"prompt": "a", "width": 64, "height": 64, "steps": 100, "num_images": 4}
        )
        a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "a", "width": 512, "height": 512})
    assert limits == {
        "native_size": NATIVE,
        "max_width": 3 * NATIVE,
        "max_height": 3 * NATIVE,
        "max_output_pixels": 4 * NATIVE**2,
        "max_steps": 150,
        "max_images": 8,
        "max_cost_pixel_steps": 1200 * NATIVE**2,
        "derived": ["max_width", "max_height", "max_output_pixels", "max_cost_pixel_steps"],
    }
    error = error_of(huge)
    assert error["detail"] == {"field": "width", "setting": "max_width", "limit": 96, "value": 512}
    assert "width 512 exceeds the server's limit of 96" in error["message"]
    assert "native size 32" in error["message"]
    error = error_of(many_pixels)
    assert error["detail"] == {"field": "width", "setting": "max_output_pixels", "limit": 4096, "value": 6144}
    error = error_of(costly)
    assert error["detail"] == {
        "field": "steps",
        "setting": "max_cost_pixel_steps",
        "limit": 1_228_800,
        "value": 64 * 64 * 100 * 4,
    }
    assert "64×64 px × 100 steps × 4 images = 1,638,400 pixel-steps" in error["message"]
    assert a1111.status_code == 422 and "limit of 96" in a1111.text


def test_settings_override_the_derived_limits(start_server: Any) -> None:
    server = start_server(max_width=128, max_output_pixels=128 * 32, max_cost_pixel_steps=128 * 32 * 2)
    with server.client() as http:
        limits = http.get("/readyz").json()["limits"]
        wide = http.post("/v1/generate", json={"prompt": "a", "width": 128, "height": 32, "steps": 2})
        longer = http.post("/v1/generate", json={"prompt": "a", "width": 128, "height": 32, "steps": 3})
    assert (limits["max_width"], limits["max_height"]) == (128, 96)
    assert limits["derived"] == ["max_height"]
    assert wide.status_code == 200, wide.text
    error = error_of(longer)
    assert error["detail"]["setting"] == "max_cost_pixel_steps" and error["detail"]["value"] == 128 * 32 * 3
    assert "derived" not in error["message"]
