"""Flux.1 through the real server (tiny-flux-random, fp32, CPU): parity with plain diffusers'
``FluxPipeline`` (with ``load_lora_weights`` + ``set_adapters``) without and with PEFT adapters, through
an A1111 prompt tag, a mixed batch against the same requests alone, the fused path against the hooked
one; distilled guidance vs true CFG; flow-matching samplers; T5 LoRAs and other families refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.errors import ValidationFailed
from basemodel.loader import BaseModel, load_base_model
from service.engine.inputs import check_size
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service import mmdit
from tests.service.mmdit import max_diff
from tests.service.test_hotswap import pixels
from tests.service.test_img2img import b64, picture
from tests.service.test_lifecycle import metric_samples, value

REQUEST = {"prompt": "a red circle", "steps": 2, "guidance_scale": 3.5, "seed": 5}
TARGETS = {
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff.net.2", "proj_mlp"],
    "text_encoder": ["q_proj", "v_proj", "fc1"],
}


@pytest.fixture(scope="module")
def flux_files(flux: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT-layout Flux LoRAs: transformer + CLIP (``full``), and a second one with other weights."""
    full = mmdit.peft_lora(flux, TARGETS, 11)
    files = {"full": full, "other": {k: (-0.8 * v if ".lora_B." in k else v) for k, v in full.items()}}
    return mmdit.save_loras(tmp_path_factory.mktemp("flux-loras"), files)


@pytest.fixture(scope="module")
def flux_store(flux: BaseModel, flux_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    return mmdit.store_with(flux, flux_files, tmp_path_factory.mktemp("flux-store"))


def generate(server: Any, **overrides: Any) -> httpx.Response:
    return mmdit.generate(server, REQUEST, **overrides)


def images(server: Any, **overrides: Any) -> list[np.ndarray]:
    return mmdit.images(server, REQUEST, **overrides)


def diffusers_reference(
    model_dir: Path,
    files: list[tuple[Path, float]] = (),
    **overrides: Any,  # type: ignore[assignment]
) -> list[np.ndarray]:
    """The same request in plain diffusers: FluxPipeline, load_lora_weights + set_adapters."""
    request = {"num_images": 1, "negative_prompt": "", "true_cfg_scale": 1.0, "scheduler": "euler"}
    request |= {**REQUEST, **overrides}
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for index, (path, _) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
    if files:
        pipe.set_adapters([f"a{i}" for i in range(len(files))], [weight for _, weight in files])
    pipe.scheduler = make_scheduler(request["scheduler"], pipe.scheduler.config, flow_matching=True)
    result = pipe(
        request["prompt"],
        negative_prompt=request["negative_prompt"] or None,
        true_cfg_scale=request["true_cfg_scale"],
        width=request.get("width", 32),
        height=request.get("height", 32),
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        num_images_per_prompt=request["num_images"],
        generator=generators_for(request["seed"], request["num_images"]),
        output_type="pil",
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_flux_is_detected_and_serves_like_flux_pipeline(start_server: Any, flux: BaseModel) -> None:
    """Family, denoiser, default size/sampler/guidance; parity without adapters (distilled guidance,
    two images), with true CFG and a negative prompt, and at another size (another ``mu``)."""
    assert (flux.family.name, flux.family.denoiser, flux.family.variant(flux.pipe)) == (
        "flux",
        "transformer",
        "dev",
    )
    assert set(flux.lora_components) == {"transformer", "text_encoder"}  # never T5
    assert flux.architecture.family == "flux" and flux.native_size == 32
    server = start_server(loader=lambda _: flux)
    body = generate(server, num_images=2).json()
    assert body["parameters"]["scheduler"] == "euler" and body["parameters"]["sampler"] == "Euler"
    ours = [pixels(image) for image in body["images"]]
    assert max_diff(ours, diffusers_reference(flux.ref.path, num_images=2)) <= 1
    cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.0, "width": 48, "height": 32}
    assert max_diff(images(server, **cfg), diffusers_reference(flux.ref.path, **cfg)) <= 1
    default_guidance = {k: v for k, v in REQUEST.items() if k != "guidance_scale"}
    with server.client() as http:
        body = http.post("/v1/generate", json=default_guidance).json()
    assert body["parameters"]["guidance_scale"] == 3.5  # FluxPipeline's default
    assert max_diff(images(server, guidance_scale=8.0), ours[:1]) > 0, "the guidance embedding must act"


def test_flux_adapters_match_load_lora_weights(
    start_server: Any, flux: BaseModel, flux_store: str, flux_files: dict[str, Path]
) -> None:
    """One PEFT adapter, two weighted ones through A1111 tags, and denoiser_scale (alias unet_scale)."""
    server = start_server(loader=lambda _: flux, store=flux_store)
    plain = images(server)
    full = images(server, adapters=[{"id": "full", "scale": 0.7}])
    assert max_diff(full, diffusers_reference(flux.ref.path, [(flux_files["full"], 0.7)])) <= 1
    assert max_diff(full, plain) > 10, "the adapter must visibly change the image"
    both = images(server, prompt="a star <lora:full:0.5> <lora:other:0.4>")
    files = [(flux_files["full"], 0.5), (flux_files["other"], 0.4)]
    assert max_diff(both, diffusers_reference(flux.ref.path, files, prompt="a star")) <= 1
    te_only = images(server, adapters=[{"id": "full", "denoiser_scale": 0.0}])
    alias = images(server, prompt="a red circle <lora:full:1:0>")  # A1111 te:unet
    assert max_diff(te_only, alias) == 0 and max_diff(te_only, plain) > 0


def test_flux_mixed_batch_rows_and_fused_path(start_server: Any, flux: BaseModel, flux_store: str) -> None:
    requests = [
        {"prompt": "a red circle", "seed": 1, "adapters": [{"id": "full", "scale": 0.8}]},
        {"prompt": "a blue square", "seed": 2, "adapters": [{"id": "other"}]},
        {"prompt": "a green star", "seed": 3, "num_images": 2, "guidance_scale": 2.0},
    ]
    alone_server = start_server(loader=lambda _: flux, store=flux_store, max_batch_size=1, lora_path="hooked")
    alone = [images(alone_server, **r) for r in requests]
    alone_server.stop()
    fused_server = start_server(loader=lambda _: flux, store=flux_store, max_batch_size=1, lora_path="fused")
    fused = images(fused_server, **requests[0])
    with fused_server.client() as http:
        assert http.post("/v1/generate", json={**REQUEST, **requests[0]}).json()["lora_path"] == "fused"
    assert max_diff(fused, alone[0]) <= 2
    fused_server.stop()
    server = start_server(loader=lambda _: flux, store=flux_store, max_batch_size=4, batch_window_ms=1500)
    for r in requests:  # make every adapter resident, so the batch is not split by cold loads
        images(server, **{**r, "steps": 1})
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        batched = list(pool.map(lambda r: images(server, **r), requests))
    samples = metric_samples(server)
    batch_counts = {s.labels["le"]: s.value for s in samples["loraswap_batch_size_bucket"]}
    assert batch_counts["1.0"] < value(samples, "loraswap_batch_size_count"), "no request was batched"
    for one, many in zip(alone, batched, strict=True):
        assert max_diff(one, many) <= 2


def test_flux_flow_samplers_match_diffusers(start_server: Any, flux: BaseModel) -> None:
    """Every flow-matching sampler FluxPipeline can run, as it runs it; FlowMatchHeun (which takes no
    custom sigmas, so FluxPipeline refuses it) runs on the config's static shift."""
    server = start_server(loader=lambda _: flux)
    euler = images(server)
    for scheduler in ("dpmpp_2m", "unipc"):
        ours = images(server, scheduler=scheduler)
        assert max_diff(ours, diffusers_reference(flux.ref.path, scheduler=scheduler)) <= 1, scheduler
    assert max_diff(images(server, scheduler="heun"), euler) > 0


def test_flux_refuses_what_it_cannot_do(
    start_server: Any, flux: BaseModel, base_model: Any, tmp_path: Path
) -> None:
    """A sampler without flow matching (422 listing those with it), inpainting (422 unsupported), a T5
    LoRA (422 saying so, nothing stored), an SD1.x adapter (409 naming both families)."""
    store = open_store(str(tmp_path / "store"))
    sd1_file = save_bytes(diffusers_layout(make_case(base_model.pipe)))
    Registry(store, BaseIdentity.from_base_model(base_model)).register(sd1_file, "sd1-style")
    server = start_server(loader=lambda _: flux, store=store.uri)
    response = generate(server, adapters=[{"id": "sd1-style"}])
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["type"] == "adapter_incompatible"
    assert "SD1.x (sd1)" in error["message"] and "Flux.1 (flux)" in error["message"], error
    response = generate(server, adapters=[{"id": "sd1-style", "denoiser_scale": 0.5, "unet_scale": 0.7}])
    assert response.status_code == 422 and "unet_scale is another name" in response.text, response.text
    released = SimpleNamespace(family=flux.family, pipe=SimpleNamespace(vae_scale_factor=8))
    with pytest.raises(ValidationFailed, match="multiple of 16") as info:  # a 1000-px request on Flux.1
        check_size(cast(Any, released), 1000, 1024)
    assert info.value.detail == {"field": "width", "multiple": 16} and "992 or 1008" in str(info.value.hint)
    response = generate(server, scheduler="ddim")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "flow matching" in error["message"] and "euler" in error["detail"]["available"]
    response = generate(server, init_image="iVBORw0KGgo=", mask_image="iVBORw0KGgo=")
    assert response.status_code == 422 and response.json()["error"]["type"] == "unsupported", response.text
    assert response.json()["error"]["detail"]["mode"] == "inpaint"
    t5 = {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 32)}
    t5 |= {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(32, 4)}
    with server.client() as http:
        response = http.post(
            "/v1/adapters", files={"file": ("t5.safetensors", save_bytes(t5))}, data={"id": "t5"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["detail"]["reason"] == "unsupported_component"
        assert "T5" in response.json()["error"]["message"]
        assert http.get("/v1/adapters/t5").status_code == 404


def test_flux_img2img_matches_flux_img2img_pipeline(start_server: Any, flux: BaseModel) -> None:
    """Image-to-image as ``FluxImg2ImgPipeline``: the image encoded once with the first generator,
    ``(z − shift) · scale``, ``scale_noise`` at the first remaining σ, packed; strength not truncated."""
    from diffusers import FluxImg2ImgPipeline

    image = picture()
    server = start_server(loader=lambda _: flux)
    for strength, count in ((0.6, 2), (0.3, 1)):  # 0.3 × 4 steps: SD's rule would run 1 step, Flux's 2
        body = {**REQUEST, "steps": 4, "init_image": b64(image), "strength": strength, "num_images": count}
        ours = images(server, **body)
        pipe = FluxImg2ImgPipeline.from_pretrained(flux.ref.path)
        pipe.set_progress_bar_config(disable=True)
        result = pipe(
            REQUEST["prompt"],
            image=image,
            strength=strength,
            width=32,
            height=32,
            num_inference_steps=4,
            guidance_scale=REQUEST["guidance_scale"],
            num_images_per_prompt=count,
            generator=generators_for(REQUEST["seed"], count),
            output_type="pil",
        )
        assert max_diff(ours, [np.asarray(i, dtype=np.int16) for i in result.images]) <= 1, strength


def test_flux_with_text_encoders_offloaded_serves_the_same_images(
    start_server: Any, flux: BaseModel, flux_store: str, loraswap_home: Path
) -> None:
    """``LORASWAP_TEXT_ENCODER_DEVICE=offload`` (here between identical devices): the encoders move for
    every batch and back, a CLIP LoRA still applies, and the images are those of the default placement."""
    offloaded = load_base_model(
        "tiny-flux-random",
        loraswap_home / "models",
        device="cpu",
        dtype="fp32",
        text_encoder_device="offload",
    )
    assert offloaded.encoders is not None and offloaded.encoders.mode == "offload"
    request = {"adapters": [{"id": "full", "scale": 0.7}]}
    reference = images(start_server(loader=lambda _: flux, store=flux_store), **request)
    server = start_server(loader=lambda _: offloaded, store=flux_store)
    moves = offloaded.encoders.moves
    assert max_diff(images(server, **request), reference) == 0
    assert offloaded.encoders.moves == moves + 2
