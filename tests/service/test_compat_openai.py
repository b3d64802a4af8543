"""``POST /v1/images/generations`` with the official ``openai`` SDK, unmodified, over loopback.

``model`` is an adapter reference or the base model; every image is compared with ``POST /v1/generate``
at the seed the server reports, and errors must raise the SDK's own exception classes.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case

TOKEN = "compat-generate-token-0123456789"


@pytest.fixture(scope="module")
def style_file(base_model: Any) -> bytes:
    return save_bytes(diffusers_layout(make_case(base_model.pipe)))


@pytest.fixture
def server(start_server: Any, base_model: Any, style_file: bytes, tmp_path: Path) -> Any:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    registry.register(style_file, "style")
    registry.register(style_file, "style-b", scale_default=0.5)
    return start_server(store=registry.store.uri, generate_tokens=[TOKEN])


def sdk(server: Any, api_key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def native(server: Any, **body: Any) -> list[np.ndarray]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with server.client() as http:
        response = http.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return [pixels(image["png_base64"]) for image in response.json()["images"]]


FAST = {"steps": 3}  # loraswap's extension through the SDK's extra_body: short tests on a 2-core CPU


def generate(server: Any, **kwargs: Any) -> tuple[Any, int]:
    """``images.generate`` through the SDK, with the seed the server reports in X-Loraswap-Seed."""
    raw = sdk(server).images.with_raw_response.generate(response_format="b64_json", extra_body=FAST, **kwargs)
    return raw.parse(), int(raw.headers["x-loraswap-seed"])


def test_model_is_an_adapter_reference(server: Any) -> None:
    response, seed = generate(server, model="style", prompt="a red fox", n=2, size="32x32")
    assert isinstance(response, openai.types.ImagesResponse)
    assert len(response.data) == 2
    for item in response.data:
        picture = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert picture.format == "PNG"
        assert picture.size == (32, 32)
        assert item.revised_prompt == "a red fox"
    expected = native(server, **FAST, prompt="a red fox", seed=seed, num_images=2, adapters=[{"id": "style"}])
    for item, want in zip(response.data, expected, strict=True):
        assert np.array_equal(pixels(item.b64_json), want)
    pinned, pinned_seed = generate(server, model="style-b@1", prompt="a red fox", size="32x32")
    want = native(
        server, **FAST, prompt="a red fox", seed=pinned_seed, adapters=[{"id": "style-b", "version": 1}]
    )
    assert np.array_equal(pixels(pinned.data[0].b64_json), want[0])  # scale_default 0.5 applies


def test_model_is_the_base_model(server: Any) -> None:
    response, seed = generate(server, model="tiny-sd", prompt="a blue square", size="32x32", user="u-1",
                              quality="hd", style="vivid")  # fmt: skip
    expected = native(server, **FAST, prompt="a blue square", seed=seed)
    assert np.array_equal(pixels(response.data[0].b64_json), expected[0])
    assert response.size == "32x32"


def test_loraswap_extensions_through_extra_body(server: Any) -> None:
    extras = {
        "seed": 11,
        "steps": 2,
        "negative_prompt": "blurry",
        "guidance_scale": 5.0,
        "scheduler": "euler",
    }
    response = sdk(server).images.generate(
        prompt="a red fox", size="32x32", response_format="b64_json", extra_body=extras
    )
    expected = native(server, prompt="a red fox", **extras)
    assert np.array_equal(pixels(response.data[0].b64_json), expected[0])


def test_unknown_model_raises_not_found(server: Any) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk(server).images.generate(model="no-such-adapter", prompt="x", size="32x32")
    assert unknown.value.status_code == 404
    error = unknown.value.body
    assert isinstance(error, dict)
    assert error["code"] == "adapter_not_found"
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        sdk(server).images.generate(model="DALL·E 3", prompt="x")  # not even an adapter id


def test_bad_input_raises_bad_request(server: Any) -> None:
    client = sdk(server)
    for kwargs, param in (
        ({"size": "33x32"}, "size"),
        ({"size": "huge"}, "size"),
        ({"size": "2048x2048"}, "size"),
        ({"n": 99}, "n"),
        ({"response_format": "url"}, "response_format"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.generate(prompt="x", **kwargs)
        assert bad.value.status_code == 400
        assert isinstance(bad.value.body, dict)
        assert bad.value.body["param"] == param, (kwargs, bad.value.body)
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="x", response_format="url")


def test_api_key_is_the_bearer_token(server: Any) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(server, api_key="not-the-token-0123456789").images.generate(prompt="x", size="32x32")
    assert refused.value.status_code == 401
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "unauthorized"


def test_url_format_answers_data_urls_when_configured(start_server: Any) -> None:
    server = start_server(openai_data_urls=True)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    response = client.images.generate(prompt="a red fox", size="32x32", response_format="url")
    url = response.data[0].url
    assert url is not None and url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).size == (32, 32)
