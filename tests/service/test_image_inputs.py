"""Untrusted init/mask images and adapter weights: every hostile image is a 422 with a stable type (never
a 500), awkward but valid files are converted as documented, limits hold, and the A1111 tag forms
and per-component weights are validated by the one scale check."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from basemodel.errors import ImageInvalid, ImageTooLarge, ValidationFailed
from loadtests.fuzz.hostile_images import (
    apng,
    b64,
    encode,
    image_cases,
    rotated_jpeg,
    sample,
    sixteen_bit_png,
    with_png_size,
)
from service.images import load, probe
from service.lora.request import extract_prompt_adapters
from tests.service.conftest import metric_value

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 4096 * 4096}
FAST = {"prompt": "a fox", "steps": 2, "seed": 1}


def decoded(data: bytes, *, mask: bool = False) -> Image.Image:
    return load(probe(b64(data), "init_image", **LIMITS), mask=mask, max_pixels=LIMITS["max_pixels"])


def test_every_hostile_image_case_gets_its_status_and_type(server: Any) -> None:
    with server.client() as http:
        for case in image_cases():
            response = http.post("/v1/generate", json={**FAST, **case.fields})
            assert response.status_code == case.status, (case.label, response.text)
            if case.error_type is not None:
                error = response.json()["error"]
                assert error["type"] == case.error_type, (case.label, error)
                if case.reason is not None:
                    assert error["detail"]["reason"] == case.reason, (case.label, error)
                assert error["detail"]["field"] in ("init_image", "mask_image", "strength"), error
    assert metric_value(server.url, "loraswap_errors_total", type="internal_error") == 0


def test_bombs_are_refused_from_the_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG declaring 5000×5000 pixels (past max_image_pixels, under PIL's own bomb limit) is refused
    by probe, which never decodes pixels; one past PIL's limit is refused the same way."""
    png = encode(sample())

    def no_decoding(*_: Any) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    for width, height in ((5000, 5000), (100_000, 100_000)):
        with pytest.raises(ImageTooLarge) as info:
            probe(b64(with_png_size(png, width, height)), "init_image", **LIMITS)
        assert info.value.detail["reason"] == "pixels"
    assert probe(b64(png), "init_image", **LIMITS).width == 32  # a good file passes the same path


def test_conversions_are_the_documented_ones() -> None:
    rgb = sample()
    assert np.array_equal(np.asarray(decoded(encode(rgb))), np.asarray(rgb))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert np.asarray(decoded(encode(rgba))).min() == 255  # alpha flattened onto white
    cmyk = decoded(encode(sample(mode="CMYK"), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.size == (32, 32)
    assert decoded(encode(sample(mode="P"))).mode == "RGB"
    assert decoded(encode(sample(mode="LA"))).mode == "RGB"
    grey = decoded(sixteen_bit_png())
    assert np.array_equal(np.asarray(grey)[..., 0], np.asarray(sample().convert("L")))  # high byte kept
    first = decoded(apng())
    assert np.array_equal(np.asarray(first), np.asarray(sample()))  # an animation gives its first frame
    rotated = probe(b64(rotated_jpeg()), "init_image", **LIMITS)
    assert (rotated.width, rotated.height) == (48, 32)
    assert decoded(rotated_jpeg()).size == (48, 32)  # EXIF orientation applied, as diffusers' load_image


def test_masks_are_grey_with_alpha_selecting_when_transparent() -> None:
    assert decoded(encode(sample()), mask=True).mode == "L"
    painted = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    painted.paste((0, 0, 0, 255), (8, 8, 24, 24))  # black strokes, opaque where to repaint (A1111)
    mask = np.asarray(decoded(encode(painted), mask=True))
    assert mask[16, 16] == 255 and mask[0, 0] == 0
    opaque = decoded(encode(Image.new("RGBA", (32, 32), (255, 255, 255, 255))), mask=True)
    assert np.asarray(opaque).min() == 255  # fully opaque: its luminance


def test_base64_rules() -> None:
    png = encode(sample())
    wrapped = "\n".join(b64(png)[i : i + 76] for i in range(0, len(b64(png)), 76))
    assert probe(wrapped, "init_image", **LIMITS).format == "PNG"  # MIME line breaks are fine
    assert probe("data:image/png;base64," + b64(png), "init_image", **LIMITS).format == "PNG"
    for bad in ("aGVsbG8", "a" * 5 + "!", "data:image/png;charset=x,abc"):
        with pytest.raises(ImageInvalid):
            probe(bad, "init_image", **LIMITS)
    with pytest.raises(ImageTooLarge) as info:
        probe(b64(png), "init_image", max_bytes=len(png) - 1, max_pixels=LIMITS["max_pixels"])
    assert info.value.detail["reason"] == "bytes"
    with pytest.raises(ImageTooLarge):  # refused from the encoded length, before decoding
        probe("A" * 8_000_000, "init_image", max_bytes=1 << 20, max_pixels=LIMITS["max_pixels"])


def test_server_limits_apply_to_images(start_server: Any) -> None:
    server = start_server(max_width=48, max_height=48, max_image_bytes=4096, max_body_bytes=64 << 10)
    big = b64(encode(sample((64, 64))))
    with server.client() as http:
        response = http.post("/v1/generate", json={**FAST, "init_image": big})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] == "image_too_large"
        assert response.json()["error"]["detail"]["reason"] == "size"
        resized = http.post("/v1/generate", json={**FAST, "init_image": big, "width": 48, "height": 48})
        assert resized.status_code == 200, resized.text
        noisy = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        heavy = b64(encode(Image.fromarray(noisy)))  # ≈ 4.8 kB of incompressible PNG
        response = http.post("/v1/generate", json={**FAST, "init_image": heavy})
        assert response.status_code == 422 and response.json()["error"]["detail"]["reason"] == "bytes"
        response = http.post("/v1/generate", json={**FAST, "init_image": "A" * (80 << 10)})
        assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
        for strength in (1.5, -0.1):
            response = http.post("/v1/generate", json={**FAST, "init_image": big, "strength": strength})
            assert response.status_code == 422 and response.json()["error"]["type"] == "validation_error"
    assert metric_value(server.url, "loraswap_errors_total", type="internal_error") == 0


@pytest.mark.parametrize(
    ("prompt", "scale", "unet_scale"),
    [
        ("a <lora:s:0.5>", 0.5, None),
        ("a <lora:s:0.5:1>", 0.5, 1.0),
        ("a <lora:s:te=0.5:unet=1>", 0.5, 1.0),
        ("a <lora:s:unet=0.25:te=1>", 1.0, 0.25),
        ("a <lora:s:unet=0>", None, 0.0),
        ("a <lora:s:te=0.3>", 0.3, None),  # A1111: the UNet follows te
        ("a <lora:s@2:0:0.7>", 0.0, 0.7),
    ],
)
def test_a1111_tag_forms(prompt: str, scale: float | None, unet_scale: float | None) -> None:
    text, found = extract_prompt_adapters(prompt)
    assert text == "a"
    assert [(r.adapter_id, r.scale, r.unet_scale, r.text_encoder_scale) for r in found] == [
        ("s", scale, unet_scale, None)
    ]


@pytest.mark.parametrize(
    "tag",
    [
        "<lora:s:1:2:3>",
        "<lora:s:dyn=4>",
        "<lora:s:te=1:te=2>",
        "<lora:s:0.5:unet=x>",
        "<lora:s:1:9>",
        "<lora:s:te=nan>",
    ],
)
def test_bad_tags_are_422_naming_the_prompt(tag: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        extract_prompt_adapters(f"a {tag}")
    assert info.value.detail["field"] == "prompt"


def test_component_weights_go_through_the_scale_check(server: Any) -> None:
    with server.client() as http:
        for spec in ({"unet_scale": 5.0}, {"text_encoder_scale": -4.5}, {"unet_scale": "1"}):
            response = http.post("/v1/generate", json={**FAST, "adapters": [{"id": "style", **spec}]})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["type"] == "validation_error"
        response = http.post("/v1/generate", json={**FAST, "prompt": "a <lora:style:1:7>"})
        assert response.status_code == 422 and "UNet weight" in response.json()["error"]["message"]


def test_schema_documents_the_new_fields(server: Any) -> None:
    with server.client() as http:
        schema = http.get("/schema/openapi.json").json()
    components = schema["components"]["schemas"]
    generate = components["GenerateRequest"]["properties"]
    assert {"init_image", "strength", "mask_image"} <= set(generate)
    assert {"unet_scale", "text_encoder_scale"} <= set(components["AdapterSpec"]["properties"])
    responses = schema["paths"]["/v1/generate"]["post"]["responses"]
    assert "image_too_large" in responses["422"]["description"]


def test_pngs_in_responses_stay_decodable_after_conversions(server: Any) -> None:
    with server.client() as http:
        body = http.post("/v1/generate", json={**FAST, "init_image": b64(rotated_jpeg())}).json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))
    assert image.size == (48, 32)  # the rotated size, rounded down to 8s
