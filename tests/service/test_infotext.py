"""The PNG's A1111 ``parameters`` infotext reproduces the image: read with a third-party parser
(``sd-parsers``) and sent back through ``/sdapi/v1/txt2img``, it draws the same pixels — every adapter of
the request (prompt tags and the ``adapters`` field) is in its prompt as a tag pinned to its version."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sd_parsers import ParserManager

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from service.engine.png import lora_tag
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case


@pytest.fixture(scope="module")
def lora_files(base_model: Any) -> list[bytes]:
    tensors = diffusers_layout(make_case(base_model.pipe))
    return [save_bytes({k: v * factor for k, v in tensors.items()}) for factor in (1.0, -1.5, 2.0)]


def decode(item: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def txt2img_from_infotext(image: Image.Image) -> dict[str, Any]:
    """An /sdapi/v1/txt2img body from what sd-parsers reads in the PNG, nothing else."""
    info = ParserManager().parse(image)
    assert info is not None, "sd-parsers found no generation parameters"
    (sampler,) = info.samplers
    width, height = (int(v) for v in info.metadata["Size"].split("x"))
    body: dict[str, Any] = {
        "prompt": info.full_prompt,
        "negative_prompt": info.full_negative_prompt,
        "sampler_name": sampler.name,
        "steps": int(sampler.parameters["steps"]),
        "cfg_scale": float(sampler.parameters["cfg_scale"]),
        "seed": int(sampler.parameters["seed"]),
        "width": width,
        "height": height,
    }
    if "Distilled CFG Scale" in info.metadata:  # Forge's field (Flux-dev), as Forge reads it back
        body["distilled_cfg_scale"] = float(info.metadata["Distilled CFG Scale"])
    return body


def test_the_png_alone_reproduces_the_image_through_txt2img(
    start_server: Any, base_model: Any, lora_files: list[bytes], tmp_path: Path
) -> None:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    registry.register(lora_files[0], "style")
    registry.register(lora_files[1], "ink")
    server = start_server(store=registry.store.uri, latest_ttl_s=0)  # 'style' is style@2 once registered
    request = {
        "prompt": "a red fox <lora:style:0.7>",  # a prompt tag …
        "negative_prompt": "blurry",
        "adapters": [{"id": "ink", "scale": 0.5, "unet_scale": 0.25}],  # … and the adapters field
        "seed": 11,
        "steps": 3,
        "width": 32,
        "height": 32,
        "scheduler": "dpmpp_2m_karras",
        "guidance_scale": 6.5,
    }
    with server.client() as http:
        first = http.post("/v1/generate", json=request)
        assert first.status_code == 200, first.text
        original = decode(first.json()["images"][0]["png_base64"])
        text = original.info["parameters"]
        prompt_line = text.splitlines()[0]
        assert "<lora:style@1:0.7>" in prompt_line and "<lora:ink@1:0.5:0.25>" in prompt_line  # pinned
        assert 'Lora hashes: "' in text and "style@1: " in text and "ink@1: " in text
        registry.register(lora_files[2], "style")  # style@2: 'style' alone would now draw another image
        body = txt2img_from_infotext(original)
        assert body["prompt"] == prompt_line and body["sampler_name"] == "DPM++ 2M Karras"
        again = http.post("/sdapi/v1/txt2img", json=body)
        assert again.status_code == 200, again.text
    reproduced = decode(again.json()["images"][0])
    assert np.array_equal(pixels(reproduced), pixels(original))
    assert reproduced.info["parameters"] == text  # the same infotext, so the same PNG
    unpinned = {**body, "prompt": body["prompt"].replace("style@1", "style")}
    with server.client() as http:
        answer = http.post("/sdapi/v1/txt2img", json=unpinned).json()
    assert {a["id"]: a["version"] for a in json.loads(answer["info"])["adapters"]} == {"style": 2, "ink": 1}
    latest = decode(answer["images"][0])
    assert not np.array_equal(pixels(latest), pixels(original)), "the pin must matter in this test"


def test_tags_round_trip_their_weights() -> None:
    base = {"id": "ink", "version": 3, "sha256": "ab" * 32}
    assert lora_tag({**base, "scale": 0.7}) == "<lora:ink@3:0.7>"
    assert lora_tag({**base, "scale": 1}) == "<lora:ink@3:1.0>"
    assert lora_tag({**base, "scale": 0.1 + 0.2}) == "<lora:ink@3:0.30000000000000004>"  # exact
    assert lora_tag({**base, "scale": 0.8, "unet_scale": -0.5}) == "<lora:ink@3:0.8:-0.5>"
    assert lora_tag({**base, "scale": 0.8, "text_encoder_scale": 0.2}) == "<lora:ink@3:0.2:0.8>"
