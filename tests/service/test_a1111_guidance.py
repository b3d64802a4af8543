"""A1111/Forge clients on Flux and SD3 (the real ``webuiapi`` client over loopback, tiny random models).

Flux follows Forge: ``distilled_cfg_scale`` (3.5) is the guidance Flux-dev embeds and ``cfg_scale`` real
classifier-free guidance, which runs (as ``FluxPipeline`` runs it) only with a negative prompt — so a
client's default ``cfg_scale`` 7 draws Flux's usual picture. The PNG says ``CFG scale: <what ran>,
Distilled CFG Scale: <embedded>`` as Forge writes it, and read back by ``sd-parsers`` it draws the same
pixels. SD3's ``cfg_scale`` is its classifier-free guidance and ``distilled_cfg_scale`` is ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import webuiapi

from basemodel.loader import BaseModel, load_base_model
from tests.service.test_compat_a1111 import client, native, pixels
from tests.service.test_infotext import txt2img_from_infotext

FAST = {"steps": 2, "width": 32, "height": 32, "sampler_name": "Euler", "seed": 5}
PROMPT = "a red circle"


def forge_txt2img(api: webuiapi.WebUIApi, **body: Any) -> webuiapi.WebUIApiResult:
    """A txt2img with fields ``webuiapi.txt2img`` has no argument for (Forge's ``distilled_cfg_scale``),
    through the client's own ``custom_post``."""
    result = api.custom_post("txt2img", {"prompt": PROMPT, **FAST, **body}, baseurl=True)
    assert isinstance(result, webuiapi.WebUIApiResult), result
    return result


def native_flux(server: Any, **body: Any) -> list[np.ndarray]:
    return native(server, prompt=PROMPT, steps=2, seed=5, scheduler="euler", **body)


def test_flux_takes_forges_cfg_and_distilled_cfg(start_server: Any, flux: BaseModel) -> None:
    """webuiapi's defaults (cfg_scale 7, no negative prompt) draw /v1/generate's guidance 3.5 without
    CFG; ``distilled_cfg_scale`` sets the embedded guidance; ``cfg_scale`` with a negative prompt is
    ``true_cfg_scale``."""
    server = start_server(loader=lambda _: flux)
    api = client(server)
    default = api.txt2img(prompt=PROMPT, **FAST)
    assert default.parameters["cfg_scale"] == 7.0 and default.parameters["distilled_cfg_scale"] == 3.5
    assert np.array_equal(pixels(default.image), native_flux(server, guidance_scale=3.5)[0])
    infotext = default.info["infotexts"][0]
    assert "Sampler: Euler, CFG scale: 1.0, Distilled CFG Scale: 3.5, Seed: 5, Size: 32x32" in infotext
    assert default.image.info["parameters"] == infotext
    assert (default.info["cfg_scale"], default.info["distilled_cfg_scale"]) == (1.0, 3.5)

    stronger = forge_txt2img(api, distilled_cfg_scale=6.0)
    assert np.array_equal(pixels(stronger.image), native_flux(server, guidance_scale=6.0)[0])
    assert not np.array_equal(pixels(stronger.image), pixels(default.image)), "the embedding must act"
    assert "CFG scale: 1.0, Distilled CFG Scale: 6.0," in stronger.info["infotexts"][0]

    guided = api.txt2img(prompt=PROMPT, negative_prompt="blurry", cfg_scale=2.0, **FAST)
    expected = native_flux(server, guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.0)
    assert np.array_equal(pixels(guided.image), expected[0])
    assert not np.array_equal(pixels(guided.image), pixels(default.image)), "true CFG must act"
    assert (
        "Negative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 2.0, Distilled CFG Scale: 3.5,"
        in (guided.info["infotexts"][0])
    )
    unguided = api.txt2img(prompt=PROMPT, negative_prompt="blurry", cfg_scale=1.0, **FAST)
    assert np.array_equal(pixels(unguided.image), pixels(default.image))  # Forge: CFG 1 ignores it


def test_flux_png_reproduces_its_image_through_sd_parsers(start_server: Any, flux: BaseModel) -> None:
    """What sd-parsers reads in the PNG (``Distilled CFG Scale`` lands in its metadata), sent back as
    Forge's fields, draws the same pixels and the same infotext — with and without true CFG."""
    server = start_server(loader=lambda _: flux)
    api = client(server)
    for body in ({}, {"negative_prompt": "blurry", "cfg_scale": 3.0, "distilled_cfg_scale": 5.0}):
        original = forge_txt2img(api, **body).image
        assert "Distilled CFG Scale: " in original.info["parameters"]
        read = txt2img_from_infotext(original)
        assert read["distilled_cfg_scale"] == body.get("distilled_cfg_scale", 3.5), read
        again = forge_txt2img(api, **read)
        assert again.image.info["parameters"] == original.info["parameters"], body
        assert np.array_equal(pixels(again.image), pixels(original)), body


def test_sd3_cfg_scale_is_classifier_free_guidance(start_server: Any, sd3: BaseModel) -> None:
    """SD3 has no guidance embedding: ``cfg_scale`` is ``guidance_scale`` (CFG with the negative
    prompt), ``distilled_cfg_scale`` is echoed and ignored, and the PNG has no ``Distilled CFG Scale``."""
    server = start_server(loader=lambda _: sd3)
    api = client(server)
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", cfg_scale=4.0, **FAST)
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "seed": 5, "scheduler": "euler"}
    expected = native(server, **body, guidance_scale=4.0)
    assert np.array_equal(pixels(result.image), expected[0])
    infotext = result.info["infotexts"][0]
    assert "Sampler: Euler, CFG scale: 4.0, Seed: 5," in infotext and "Distilled" not in infotext
    assert result.info["distilled_cfg_scale"] is None
    ignored = forge_txt2img(api, negative_prompt="blurry", cfg_scale=4.0, distilled_cfg_scale=9.0)
    assert ignored.parameters["distilled_cfg_scale"] == 9.0
    assert np.array_equal(pixels(ignored.image), pixels(result.image))


def test_flux_schnell_has_no_distilled_guidance(start_server: Any, tmp_path: Path) -> None:
    """schnell embeds no guidance: ``distilled_cfg_scale`` changes nothing and is not written, as Forge
    leaves it out for schnell; ``cfg_scale`` without a negative prompt runs no CFG (``CFG scale: 1.0``)."""
    from basemodel.families.flux.tiny import build_tiny_flux_pipeline

    folder = tmp_path / "schnell"
    build_tiny_flux_pipeline(schnell=True).save_pretrained(folder, safe_serialization=True)
    schnell = load_base_model(str(folder), tmp_path / "models", device="cpu", dtype="fp32")
    assert schnell.family.variant(schnell.pipe) == "schnell"
    api = client(start_server(loader=lambda _: schnell))
    default = api.txt2img(prompt=PROMPT, **FAST)
    infotext = default.info["infotexts"][0]
    assert "Sampler: Euler, CFG scale: 1.0, Seed: 5," in infotext and "Distilled" not in infotext
    assert default.info["distilled_cfg_scale"] is None
    other = forge_txt2img(api, distilled_cfg_scale=6.0)
    assert np.array_equal(pixels(other.image), pixels(default.image))
