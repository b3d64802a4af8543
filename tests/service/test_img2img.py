"""Image-to-image and inpainting through the real server, against plain diffusers' Img2Img / Inpaint
pipelines (SD1 and SDXL, 4- and 9-channel UNets) with the documented generators, with and without
adapters, per-component adapter weights, sizes, PNG parameters, metrics, batching."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.loader import BaseModel, load_base_model
from service.engine.image_modes import ImageInput
from service.engine.sampler import SampleParams, generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.conftest import metric_value
from tests.service.test_hotswap import pixels, stored_file

REQUEST: dict[str, Any] = {
    "prompt": "a red circle",
    "negative_prompt": "blurry",
    "steps": 5,
    "guidance_scale": 6.0,
    "seed": 3,
    "strength": 0.6,
}
SD_CLASSES = {"img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline}
XL_CLASSES = {"img2img": StableDiffusionXLImg2ImgPipeline, "inpaint": StableDiffusionXLInpaintPipeline}


def picture(width: int = 32, height: int = 32) -> Image.Image:
    """A deterministic init image: a colour gradient with a dark square."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), 128 + 0 * x], axis=-1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = 20
    return Image.fromarray(rgb.astype(np.uint8))


def square_mask(width: int = 32, height: int = 32) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 : width] = 255
    return Image.fromarray(mask)


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def post(server: Any, **fields: Any) -> dict[str, Any]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def images_of(body: dict[str, Any]) -> list[np.ndarray]:
    return [pixels(image) for image in body["images"]]


def max_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    assert len(ours) == len(theirs)
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def reference(pipe: Any, mode: str, *, mask: Image.Image | None = None, **overrides: Any) -> list[np.ndarray]:
    """The same request in plain diffusers: ``pipe`` is an Img2Img/Inpaint pipeline; generators
    ``[Generator("cpu").manual_seed(seed + i)]``; the inpaint pipelines get the size explicitly (their
    default is the model's native size, loraswap's the init image's)."""
    r = {"num_images": 1, "scheduler": "ddim", "image": picture(), **REQUEST, **overrides}
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(r["scheduler"], pipe.scheduler.config)
    extra: dict[str, Any] = {}
    if mode == "inpaint":
        extra = {"mask_image": mask, "height": r["image"].height, "width": r["image"].width}
    result = pipe(
        r["prompt"],
        image=r["image"],
        strength=r["strength"],
        negative_prompt=r["negative_prompt"] or None,
        num_inference_steps=r["steps"],
        guidance_scale=r["guidance_scale"],
        num_images_per_prompt=r["num_images"],
        generator=generators_for(r["seed"], r["num_images"]),
        output_type="pil",
        **extra,
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def sd_pipe(base: Any, mode: str) -> Any:
    """An Img2Img/Inpaint pipeline over the served model's own modules (no adapter is loaded into it)."""
    return SD_CLASSES[mode](**base.pipe.components)


@pytest.fixture(scope="module")
def sdxl(loraswap_home: Path) -> BaseModel:
    return load_base_model("tiny-sdxl-random", loraswap_home / "models", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def inpainting(loraswap_home: Path) -> BaseModel:
    return load_base_model("tiny-sd-inpaint-random", loraswap_home / "models", device="cpu", dtype="fp32")


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_img2img_matches_diffusers(server: Any, base_model: Any, scheduler: str) -> None:
    body = post(server, init_image=b64(picture()), num_images=2, scheduler=scheduler)
    ours = images_of(body)
    assert (
        max_diff(
            ours, reference(sd_pipe(base_model, "img2img"), "img2img", num_images=2, scheduler=scheduler)
        )
        <= 1
    )
    txt2img = images_of(post(server, num_images=2, scheduler=scheduler))
    assert max_diff(ours, txt2img) > 10, "the init image must shape the result"


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_with_a_4_channel_unet_matches_diffusers(
    server: Any, base_model: Any, strength: float
) -> None:
    mask = square_mask()
    body = post(server, init_image=b64(picture()), mask_image=b64(mask), strength=strength, scheduler="euler")
    theirs = reference(
        sd_pipe(base_model, "inpaint"), "inpaint", mask=mask, strength=strength, scheduler="euler"
    )
    assert max_diff(images_of(body), theirs) <= 1
    assert body["parameters"]["mode"] == "inpaint"


def test_inpainting_checkpoint_is_detected_and_matches_diffusers(
    start_server: Any, inpainting: BaseModel
) -> None:
    """tiny-sd-inpaint-random (StableDiffusionInpaintPipeline folder, 9-channel UNet): detected as an SD1
    inpainting model, warmed up with an inpaint, served like diffusers' inpaint pipeline; text-to-image
    and plain image-to-image on it are 422."""
    assert inpainting.family.name == "sd1" and inpainting.family.inpainting(inpainting.pipe)
    server = start_server(loader=lambda _: inpainting, warmup=True)
    mask = square_mask()
    pipe = StableDiffusionInpaintPipeline(**inpainting.pipe.components)
    for strength in (1.0, 0.5):
        body = post(server, init_image=b64(picture()), mask_image=b64(mask), strength=strength, num_images=2)
        theirs = reference(pipe, "inpaint", mask=mask, strength=strength, num_images=2)
        assert max_diff(images_of(body), theirs) <= 1
    with server.client() as http:
        for extra in ({}, {"init_image": b64(picture())}):
            response = http.post("/v1/generate", json={**REQUEST, **extra})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["detail"]["field"] == "mask_image"
            assert "inpainting checkpoint" in response.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_sdxl_img2img_and_inpaint_match_diffusers(start_server: Any, sdxl: BaseModel, mode: str) -> None:
    server = start_server(loader=lambda _: sdxl)
    mask = square_mask() if mode == "inpaint" else None
    extra = {"mask_image": b64(mask)} if mask is not None else {}
    body = post(server, init_image=b64(picture()), scheduler="euler", num_images=2, **extra)
    pipe = XL_CLASSES[mode](**sdxl.pipe.components)
    theirs = reference(pipe, mode, mask=mask, scheduler="euler", num_images=2)
    assert max_diff(images_of(body), theirs) <= 1


@pytest.fixture(scope="module")
def style_bytes(base_model: Any) -> bytes:
    """A peft LoRA on tiny-sd's UNet (incl. LoCon) and text encoder."""
    return save_bytes(diffusers_layout(make_case(base_model.pipe)))


def weighted(pipe: Any, weights: Any) -> Any:
    pipe.set_adapters(["style"], [weights])
    return pipe


def test_adapters_and_per_component_weights_match_diffusers(
    start_server: Any,
    registry: Registry,
    style_bytes: bytes,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """img2img and inpaint with an adapter = diffusers' load_lora_weights + set_adapters; unet_scale=0
    equals diffusers with the adapter's UNet weight 0 (text encoder only), the A1111 tag forms equal the
    JSON fields, and each component's weight acts on its own."""
    registry.register(style_bytes, "style")
    lora = stored_file(registry, "style", tmp_path)
    server = start_server(store=registry.store.uri)
    init, mask = b64(picture()), square_mask()

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    img2img.load_lora_weights(str(lora), adapter_name="style")
    inpaint = StableDiffusionInpaintPipeline(**img2img.components)  # the same LoRA-carrying modules

    full = post(server, init_image=init, adapters=[{"id": "style", "scale": 0.8}])
    assert full["adapters"][0]["scale"] == 0.8
    theirs = reference(weighted(img2img, 0.8), "img2img")
    assert max_diff(images_of(full), theirs) <= 1

    te_only = post(server, init_image=init, adapters=[{"id": "style", "scale": 0.8, "unet_scale": 0.0}])
    assert te_only["adapters"][0]["unet_scale"] == 0.0
    weights = {"unet": 0.0, "text_encoder": 0.8}
    theirs = reference(weighted(img2img, weights), "img2img")
    assert max_diff(images_of(te_only), theirs) <= 1
    plain = images_of(post(server, init_image=init))
    assert max_diff(images_of(te_only), plain) > 3, "the text-encoder part must act alone"
    assert max_diff(images_of(te_only), images_of(full)) > 3, "unet_scale=0 must switch the UNet part off"

    for tag in ("<lora:style:0.8:0>", "<lora:style:te=0.8:unet=0>"):
        tagged = post(server, init_image=init, prompt=f"a red circle {tag}")
        assert tagged["images"] == te_only["images"], tag
    unet_only = {"id": "style", "unet_scale": 0.5, "text_encoder_scale": 0.0}
    split = post(server, init_image=init, mask_image=b64(mask), adapters=[unet_only])
    weights = {"unet": 0.5, "text_encoder": 0.0}
    assert max_diff(images_of(split), reference(weighted(inpaint, weights), "inpaint", mask=mask)) <= 1


def test_sdxl_inpaint_with_an_adapter_matches_diffusers(
    start_server: Any, sdxl: BaseModel, tmp_path: Path
) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from tests.service.test_sdxl import TARGETS

    torch.manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for component, targets in TARGETS.items():
        model = copy.deepcopy(sdxl.lora_components[component])
        inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), model
        )
        tensors |= {f"{component}.{k}": v.detach() for k, v in get_peft_model_state_dict(model).items()}
    path = tmp_path / "xl.safetensors"
    path.write_bytes(save_bytes(tensors))
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(sdxl))
    registry.register(path, "xl")
    server = start_server(loader=lambda _: sdxl, store=registry.store.uri)
    mask = square_mask()
    body = post(
        server,
        init_image=b64(picture()),
        mask_image=b64(mask),
        scheduler="euler",
        prompt="a star <lora:xl:0.7>",
    )
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(sdxl.ref.path, add_watermarker=False)
    pipe.load_lora_weights(str(path), adapter_name="xl")
    pipe.set_adapters(["xl"], [0.7])
    theirs = reference(pipe, "inpaint", mask=mask, scheduler="euler", prompt="a star")
    assert max_diff(images_of(body), theirs) <= 1


def test_size_defaults_to_the_init_image_rounded_down_to_8(server: Any, base_model: Any) -> None:
    body = post(server, init_image=b64(picture(52, 44)), steps=2)
    assert [(i["width"], i["height"]) for i in body["images"]] == [(48, 40)]
    # diffusers' VaeImageProcessor resizes to the size asked for, as the server does
    theirs = reference(
        sd_pipe(base_model, "img2img"),
        "img2img",
        image=picture(52, 44).resize((48, 40), Image.LANCZOS),
        steps=2,
    )
    assert max_diff(images_of(body), theirs) <= 1
    resized = post(server, init_image=b64(picture(52, 44)), steps=2, width=32, height=32)
    assert [(i["width"], i["height"]) for i in resized["images"]] == [(32, 32)]


def test_png_parameters_timings_and_metrics_record_the_mode(server: Any) -> None:
    body = post(server, init_image=b64(picture()), strength=0.6, steps=5)
    assert body["parameters"]["mode"] == "img2img" and body["parameters"]["strength"] == 0.6
    text = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"]))).text["parameters"]
    assert "Denoising strength: 0.6, Mode: img2img" in text
    assert "Steps: 5," in text  # A1111 records the steps asked for; int(5 × 0.6) = 3 of them run
    assert body["timings"]["image_encode_s"] > 0 and body["timings"]["denoise_s"] > 0
    assert metric_value(server.url, "loraswap_generations_total", mode="img2img") == 1
    assert metric_value(server.url, "loraswap_stage_duration_seconds_count", stage="image_encode") == 1
    txt = post(server, steps=2)
    assert txt["parameters"]["mode"] == "txt2img" and "strength" not in txt["parameters"]
    assert metric_value(server.url, "loraswap_generations_total", mode="txt2img") == 1


def test_multipart_form_equals_json(server: Any) -> None:
    import json

    init, mask = picture(), square_mask()
    as_json = post(server, init_image=b64(init), mask_image=b64(mask), steps=3)
    png = base64.b64decode(b64(init))
    files = {
        "request": (None, json.dumps({**REQUEST, "steps": 3}), "application/json"),
        "init_image": ("init.png", png, "image/png"),
        "mask_image": ("mask.png", base64.b64decode(b64(mask)), "image/png"),
    }
    with server.client() as http:
        response = http.post("/v1/generate", files=files)
        assert response.status_code == 200, response.text
        assert response.json()["images"] == as_json["images"]
        clash = {**files, "request": (None, json.dumps({**REQUEST, "init_image": b64(init)}))}
        refused = http.post("/v1/generate", files=clash)
        assert refused.status_code == 422 and refused.json()["error"]["detail"]["field"] == "init_image"
        stray = http.post("/v1/generate", files={**files, "other": ("x", b"1")})
        assert stray.status_code == 422 and stray.json()["error"]["detail"]["field"] == "other"


def test_batch_key_covers_mode_and_start_step() -> None:
    image = ImageInput(picture(), None, 0.6)
    plain = SampleParams("p", "", 10, 7.5, 32, 32, 0, 1, "ddim")
    img2img = SampleParams("q", "", 10, 7.5, 32, 32, 1, 1, "ddim", image=image)
    same_start = SampleParams("r", "", 10, 7.5, 32, 32, 2, 1, "ddim", image=ImageInput(picture(), None, 0.65))
    other_start = SampleParams("s", "", 10, 7.5, 32, 32, 3, 1, "ddim", image=ImageInput(picture(), None, 0.8))
    inpaint = SampleParams(
        "t", "", 10, 7.5, 32, 32, 4, 1, "ddim", image=ImageInput(picture(), square_mask(), 0.6)
    )
    assert plain.batch_key() != img2img.batch_key()
    assert img2img.batch_key() == same_start.batch_key()  # int(10 × 0.6) == int(10 × 0.65): same steps
    assert img2img.batch_key() != other_start.batch_key()
    assert img2img.batch_key() != inpaint.batch_key()


def test_batched_image_requests_equal_requests_alone(start_server: Any) -> None:
    mask = b64(square_mask())
    requests = [
        {"init_image": b64(picture()), "seed": 1, "steps": 4},
        {
            "init_image": b64(picture().transpose(Image.FLIP_LEFT_RIGHT)),
            "seed": 2,
            "steps": 4,
            "num_images": 2,
        },
        {"init_image": b64(picture()), "mask_image": mask, "seed": 3, "steps": 4},
        {
            "init_image": b64(picture(24, 32)),
            "mask_image": b64(square_mask(24, 32)),
            "seed": 4,
            "steps": 4,
            "width": 32,
            "height": 32,
        },
    ]
    alone_server = start_server(max_batch_size=1)
    alone = [images_of(post(alone_server, **r)) for r in requests]
    alone_server.stop()
    server = start_server(max_batch_size=4, batch_window_ms=1500)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        batched = list(pool.map(lambda r: images_of(post(server, **r)), requests))
    count = metric_value(server.url, "loraswap_batch_size_count")
    assert count < len(requests), "no request was batched"
    for one, many in zip(alone, batched, strict=True):
        assert max_diff(one, many) <= 2
