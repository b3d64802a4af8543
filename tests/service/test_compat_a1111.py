"""The A1111-compatible routes with the real ``webuiapi`` client from PyPI, unmodified, over loopback.

Each generation is compared pixel for pixel with the same request sent to ``POST /v1/generate``: the
compatible routes translate, they do not generate on their own.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from service.compat.a1111 import img2img_supported, offered_samplers, scheduler_for
from service.compat.errors import SamplerNotFound, UnsupportedOption
from service.schemas import GenerateRequest
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case

TOKEN = "compat-generate-token-0123456789"
FAST = {"steps": 3, "width": 32, "height": 32, "sampler_name": "DDIM"}
NO_IMG2IMG = pytest.mark.skipif(
    "init_image" not in GenerateRequest.model_fields,
    reason="GenerateRequest has no init_image yet (img2img lands with the wip/img2img branch)",
)


@pytest.fixture(scope="module")
def style_file(base_model: Any) -> bytes:
    return save_bytes(diffusers_layout(make_case(base_model.pipe)))


@pytest.fixture
def server(start_server: Any, base_model: Any, style_file: bytes, tmp_path: Path) -> Any:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    registry.register(style_file, "style")
    return start_server(store=registry.store.uri)


def client(server: Any, **kwargs: Any) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def native(server: Any, **body: Any) -> list[np.ndarray]:
    """The same generation through /v1/generate."""
    with server.client() as http:
        response = http.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return [
        pixels(Image.open(io.BytesIO(base64.b64decode(i["png_base64"])))) for i in response.json()["images"]
    ]


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_txt2img_matches_v1_generate(server: Any) -> None:
    api = client(server)
    result = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=7, batch_size=2, **FAST)
    assert [image.size for image in result.images] == [(32, 32), (32, 32)]
    assert result.info["seed"] == 7
    assert result.info["all_seeds"] == [7, 8]
    assert result.info["sampler_name"] == "DDIM"
    assert result.parameters["prompt"] == "a red fox"
    infotext = result.info["infotexts"][1]
    assert infotext.startswith("a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 7.0,")
    assert "Seed: 8, Size: 32x32" in infotext
    assert result.images[0].info["parameters"].splitlines()[0] == "a red fox"  # the PNG keeps its chunk
    expected = native(
        server,
        prompt="a red fox",
        negative_prompt="blurry",
        seed=7,
        num_images=2,
        steps=3,
        guidance_scale=7.0,
        scheduler="ddim",
    )
    for got, want in zip(result.images, expected, strict=True):
        assert np.array_equal(pixels(got), want)


def test_lora_tag_in_the_prompt_applies_the_adapter(server: Any) -> None:
    api = client(server)
    tagged = api.txt2img(prompt="a red fox <lora:style:0.7>", seed=3, **FAST)
    plain = api.txt2img(prompt="a red fox", seed=3, **FAST)
    expected = native(
        server, prompt="a red fox", seed=3, steps=3, scheduler="ddim", guidance_scale=7.0,
        adapters=[{"id": "style", "scale": 0.7}],
    )  # fmt: skip
    assert np.array_equal(pixels(tagged.image), expected[0])
    assert not np.array_equal(pixels(tagged.image), pixels(plain.image))
    infotext = tagged.info["infotexts"][0]
    # as A1111 writes it, pinned to the version served: pasting it reproduces the image
    assert infotext.startswith("a red fox <lora:style@1:0.7>\n")
    assert 'Lora hashes: "style@1: ' in infotext
    assert tagged.image.info["parameters"] == infotext  # the PNG's chunk says the same
    assert tagged.info["adapters"][0]["id"] == "style"


def test_samplers_and_karras_schedule(server: Any) -> None:
    api = client(server)
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M"} <= set(names)
    assert {s["label"] for s in api.get_schedulers()} == {"Automatic", "Karras"}
    body = {**FAST, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    karras = api.txt2img(prompt="a blue square", seed=5, **body)
    assert karras.info["sampler_name"] == "DPM++ 2M"
    assert karras.info["scheduler"] == "Karras"
    expected = native(
        server, prompt="a blue square", seed=5, steps=3, scheduler="dpmpp_2m_karras", guidance_scale=7.0
    )
    assert np.array_equal(pixels(karras.image), expected[0])
    sde = api.txt2img(prompt="a blue square", seed=5, **{**FAST, "sampler_name": "DPM++ 2M SDE Karras"})
    assert (sde.info["sampler_name"], sde.info["scheduler"]) == ("DPM++ 2M SDE", "Karras")
    assert {"DPM++ SDE", "DPM++ 2M SDE"} <= set(names)
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="x", **{**FAST, "sampler_name": "LMS"})
    assert refused.value.args[0] == 404
    assert "sampler_not_found" in refused.value.args[1]


def test_seed_minus_one_is_random_and_reported(server: Any) -> None:
    api = client(server)
    first = api.txt2img(prompt="a red fox", seed=-1, **FAST)
    second = api.txt2img(prompt="a red fox", seed=-1, **FAST)
    assert first.info["seed"] != second.info["seed"]
    replay = api.txt2img(prompt="a red fox", seed=first.info["seed"], **FAST)
    assert np.array_equal(pixels(replay.image), pixels(first.image))


def test_get_loras_sd_models_options_and_progress(server: Any) -> None:
    api = client(server)
    loras = api.get_loras()
    assert [lora["name"] for lora in loras] == ["style"]
    assert loras[0]["path"] == "style@1"
    models = api.get_sd_models()
    assert len(models) == 1
    assert models[0]["model_name"] == "tiny-sd"
    assert models[0]["title"] == f"tiny-sd [{models[0]['sha256'][:10]}]"
    assert api.util_get_current_model() == models[0]["title"]
    api.util_set_model("tiny-sd")  # POST /options with the closest checkpoint name
    other = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "sdxl.safetensors"})
    assert other.status_code == 404, other.text  # set_options does not check the status itself
    assert other.json()["error"]["type"] == "model_not_found"
    progress = api.get_progress()
    assert progress["progress"] == 0.0
    assert progress["state"]["job_count"] == 0
    assert progress["current_image"] is None
    api.util_wait_for_ready(check_interval=0.1)  # returns at once when idle


def test_unsupported_options_are_refused_not_ignored(server: Any) -> None:
    api = client(server)
    for option in ({"enable_hr": True}, {"restore_faces": True}, {"subseed_strength": 0.5}):
        with pytest.raises(RuntimeError) as refused:
            api.txt2img(prompt="x", **FAST, **option)
        assert refused.value.args[0] == 422
        assert "unsupported_option" in refused.value.args[1]


def test_basic_auth_with_the_token_as_password(start_server: Any) -> None:
    server = start_server(generate_tokens=[TOKEN])
    with pytest.raises(RuntimeError) as refused:
        client(server).txt2img(prompt="x", **FAST)
    assert refused.value.args[0] == 401
    with pytest.raises(RuntimeError) as wrong:
        client(server, username="webui", password="not-the-token-0123456789").txt2img(prompt="x", **FAST)
    assert wrong.value.args[0] == 401
    result = client(server, username="webui", password=TOKEN).txt2img(prompt="x", seed=1, **FAST)
    assert result.info["seed"] == 1
    bearer = client(server)
    bearer.session.headers["Authorization"] = f"Bearer {TOKEN}"
    assert bearer.get_sd_models()[0]["model_name"] == "tiny-sd"


@pytest.mark.skipif(img2img_supported(), reason="this build has img2img: see the img2img tests")
def test_img2img_refused_with_a_typed_error_without_image_to_image(server: Any) -> None:
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    with pytest.raises(RuntimeError) as refused:
        client(server).img2img(images=[init], prompt="a red fox", **FAST)
    assert refused.value.args[0] == 422
    assert "img2img_unavailable" in refused.value.args[1]


@NO_IMG2IMG
def test_img2img_matches_v1_generate(server: Any) -> None:
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    result = client(server).img2img(images=[init], denoising_strength=0.6, prompt="a red fox", seed=4, **FAST)
    assert result.image.size == (32, 32)
    expected = native(
        server, prompt="a red fox", seed=4, steps=3, scheduler="ddim", guidance_scale=7.0,
        init_image=png_b64(init), strength=0.6,
    )  # fmt: skip
    assert np.array_equal(pixels(result.image), expected[0])
    assert result.parameters["init_images"] is None  # include_init_images=False, as A1111


@NO_IMG2IMG
def test_inpainting_matches_v1_generate(server: Any) -> None:
    init = Image.new("RGB", (32, 32), (30, 30, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # white = repaint
    result = client(server).img2img(
        images=[init], mask_image=mask, denoising_strength=0.8, prompt="a yellow circle", seed=2, **FAST
    )
    expected = native(
        server, prompt="a yellow circle", seed=2, steps=3, scheduler="ddim", guidance_scale=7.0,
        init_image=png_b64(init), mask_image=png_b64(mask), strength=0.8,
    )  # fmt: skip
    assert np.array_equal(pixels(result.image), expected[0])


def test_sampler_names_translate_as_a1111_splits_them() -> None:
    assert scheduler_for(None, None) == "euler"  # A1111's API default sampler
    assert scheduler_for("Euler a", "automatic") == "euler_a"
    assert scheduler_for("DPM++ 2M Karras", None) == "dpmpp_2m_karras"  # A1111 < 1.9 combined name
    assert scheduler_for("DPM++ 2M", "karras") == "dpmpp_2m_karras"
    assert scheduler_for("k_euler_a", None) == "euler_a"
    # issue 20, item 10: the SDE samplers webuiapi users ask for, old combined names included
    assert scheduler_for("DPM++ 2M SDE", None) == "dpmpp_2m_sde"
    assert scheduler_for("DPM++ 2M SDE Karras", None) == "dpmpp_2m_sde_karras"
    assert scheduler_for("DPM++ 2M SDE", "Karras") == "dpmpp_2m_sde_karras"
    assert scheduler_for("DPM++ SDE Karras", None) == "dpmpp_sde_karras"
    assert scheduler_for("dpm++ sde", "automatic") == "dpmpp_sde"
    with pytest.raises(SamplerNotFound) as unknown:
        scheduler_for("LMS", None)
    for offered in offered_samplers():  # issue 20, item 9: the refusal lists what is offered
        assert offered.name in unknown.value.message
    assert unknown.value.detail["available"] == [s.name for s in offered_samplers()]
    with pytest.raises(SamplerNotFound) as typo:
        scheduler_for("Eular a", None)
    assert typo.value.detail["suggestion"] == "Euler a" and "did you mean 'Euler a'?" in typo.value.message
    with pytest.raises(UnsupportedOption):
        scheduler_for("Euler", "Karras")


def test_basic_credentials_carry_the_token() -> None:
    from types import SimpleNamespace

    from service.auth import basic_token

    def header(value: str) -> Any:
        return SimpleNamespace(headers={"authorization": value})

    encoded = base64.b64encode(f"webui:{TOKEN}".encode()).decode()
    assert basic_token(header(f"Basic {encoded}")) == TOKEN
    user_only = base64.b64encode(f"{TOKEN}:".encode()).decode()
    assert basic_token(header(f"basic {user_only}")) == TOKEN  # the token as the user name
    assert basic_token(header("Basic not base64!")) is None
    assert basic_token(header(f"Bearer {TOKEN}")) is None
    assert basic_token(header("Basic " + base64.b64encode(b":").decode())) is None
