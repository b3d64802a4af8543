"""SD3/SD3.5 through the real server (tiny-sd3-random, fp32, CPU): parity with plain diffusers'
``StableDiffusion3Pipeline`` (with ``load_lora_weights`` + ``set_adapters``) without and with PEFT
adapters on the transformer and both CLIPs, through an A1111 prompt tag, a mixed batch against the same
requests alone, the fused path against the hooked one; image-to-image as its Img2Img pipeline; a model
without T5; T5 LoRAs refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from basemodel.loader import BaseModel, load_base_model
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters.conftest import save_bytes
from tests.service import mmdit
from tests.service.mmdit import max_diff
from tests.service.test_hotswap import pixels
from tests.service.test_img2img import b64, picture
from tests.service.test_lifecycle import metric_samples, value

REQUEST = {"prompt": "a red circle", "steps": 2, "guidance_scale": 5.0, "seed": 5}
TARGETS = {  # diffusers' train_dreambooth_lora_sd3.py targets, plus the MLP
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "to_add_out", "ff.net.2"],
    "text_encoder": ["q_proj", "v_proj", "fc1"],
    "text_encoder_2": ["k_proj", "out_proj"],
}


@pytest.fixture(scope="module")
def sd3_files(sd3: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT-layout SD3 LoRAs: transformer + both CLIPs (``full``), one on CLIP-G alone, and a second
    full one with other weights."""
    full = mmdit.peft_lora(sd3, TARGETS, 11)
    files = {
        "full": full,
        "te2": {k: v for k, v in full.items() if k.startswith("text_encoder_2.")},
        "other": {k: (-0.8 * v if ".lora_B." in k else v) for k, v in full.items()},
    }
    return mmdit.save_loras(tmp_path_factory.mktemp("sd3-loras"), files)


@pytest.fixture(scope="module")
def sd3_store(sd3: BaseModel, sd3_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    return mmdit.store_with(sd3, sd3_files, tmp_path_factory.mktemp("sd3-store"))


def generate(server: Any, **overrides: Any) -> httpx.Response:
    return mmdit.generate(server, REQUEST, **overrides)


def images(server: Any, **overrides: Any) -> list[np.ndarray]:
    return mmdit.images(server, REQUEST, **overrides)


def diffusers_reference(
    model_dir: Path,
    files: list[tuple[Path, float]] = (),
    **overrides: Any,  # type: ignore[assignment]
) -> list[np.ndarray]:
    """The same request in plain diffusers: StableDiffusion3Pipeline, load_lora_weights + set_adapters."""
    request = {"num_images": 1, "negative_prompt": "", "scheduler": "euler", **REQUEST, **overrides}
    without_t5 = not (model_dir / "text_encoder_3").is_dir()
    extra = {"text_encoder_3": None, "tokenizer_3": None} if without_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, **extra)
    pipe.set_progress_bar_config(disable=True)
    for index, (path, _) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
    if files:
        pipe.set_adapters([f"a{i}" for i in range(len(files))], [weight for _, weight in files])
    pipe.scheduler = make_scheduler(request["scheduler"], pipe.scheduler.config, flow_matching=True)
    result = pipe(
        request["prompt"],
        negative_prompt=request["negative_prompt"] or None,
        width=request.get("width", 32),
        height=request.get("height", 32),
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        num_images_per_prompt=request["num_images"],
        generator=generators_for(request["seed"], request["num_images"]),
        output_type="pil",
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_sd3_is_detected_and_serves_like_its_pipeline(start_server: Any, sd3: BaseModel) -> None:
    """Family, denoiser, defaults; parity without adapters (CFG with the empty negative, two images),
    with a negative prompt at another size, without CFG, and with FlowMatchHeun."""
    family = sd3.family
    assert (family.name, family.denoiser, family.variant(sd3.pipe.transformer.config)) == (
        "sd3",
        "transformer",
        "sd3.5",
    )
    assert set(sd3.lora_components) == {"transformer", "text_encoder", "text_encoder_2"}  # never T5
    assert sd3.architecture.family == "sd3" and sd3.native_size == 32
    server = start_server(loader=lambda _: sd3)
    body = generate(server, num_images=2).json()
    assert body["parameters"]["scheduler"] == "euler"
    ours = [pixels(image) for image in body["images"]]
    assert max_diff(ours, diffusers_reference(sd3.ref.path, num_images=2)) <= 1
    for request in (
        {"negative_prompt": "blurry", "width": 48, "height": 32, "guidance_scale": 4.0},
        {"guidance_scale": 1.0},
        {"scheduler": "heun"},
        {"scheduler": "dpmpp_2m"},
    ):
        assert max_diff(images(server, **request), diffusers_reference(sd3.ref.path, **request)) <= 1, request
    with server.client() as http:
        body = http.post("/v1/generate", json={"prompt": "a cat", "steps": 1}).json()
    assert body["parameters"]["guidance_scale"] == 7.0  # StableDiffusion3Pipeline's default


def test_sd3_adapters_match_load_lora_weights(
    start_server: Any, sd3: BaseModel, sd3_store: str, sd3_files: dict[str, Path]
) -> None:
    """One PEFT adapter (transformer + both CLIPs), one on CLIP-G alone, two weighted ones through
    A1111 tags."""
    server = start_server(loader=lambda _: sd3, store=sd3_store)
    plain = images(server)
    full = images(server, adapters=[{"id": "full", "scale": 0.7}])
    assert max_diff(full, diffusers_reference(sd3.ref.path, [(sd3_files["full"], 0.7)])) <= 1
    assert max_diff(full, plain) > 10, "the adapter must visibly change the image"
    second = images(server, adapters=[{"id": "te2"}])
    assert max_diff(second, diffusers_reference(sd3.ref.path, [(sd3_files["te2"], 1.0)])) <= 1
    assert max_diff(second, plain) > 0, "a text_encoder_2 adapter must change the image"
    both = images(server, prompt="a star <lora:full:0.5> <lora:other:0.4>")
    files = [(sd3_files["full"], 0.5), (sd3_files["other"], 0.4)]
    assert max_diff(both, diffusers_reference(sd3.ref.path, files, prompt="a star")) <= 1


def test_sd3_mixed_batch_rows_and_fused_path(start_server: Any, sd3: BaseModel, sd3_store: str) -> None:
    requests = [
        {"prompt": "a red circle", "seed": 1, "adapters": [{"id": "full", "scale": 0.8}]},
        {"prompt": "a blue square", "seed": 2, "negative_prompt": "dark", "adapters": [{"id": "other"}]},
        {"prompt": "a green star", "seed": 3, "num_images": 2, "guidance_scale": 3.0},
    ]
    alone_server = start_server(loader=lambda _: sd3, store=sd3_store, max_batch_size=1, lora_path="hooked")
    alone = [images(alone_server, **r) for r in requests]
    alone_server.stop()
    fused_server = start_server(loader=lambda _: sd3, store=sd3_store, max_batch_size=1, lora_path="fused")
    with fused_server.client() as http:
        body = http.post("/v1/generate", json={**REQUEST, **requests[0]}).json()
    assert body["lora_path"] == "fused"
    assert max_diff([pixels(image) for image in body["images"]], alone[0]) <= 2
    fused_server.stop()
    server = start_server(loader=lambda _: sd3, store=sd3_store, max_batch_size=4, batch_window_ms=1500)
    for r in requests:  # make every adapter resident, so the batch is not split by cold loads
        images(server, **{**r, "steps": 1})
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        batched = list(pool.map(lambda r: images(server, **r), requests))
    samples = metric_samples(server)
    batch_counts = {s.labels["le"]: s.value for s in samples["loraswap_batch_size_bucket"]}
    assert batch_counts["1.0"] < value(samples, "loraswap_batch_size_count"), "no request was batched"
    for one, many in zip(alone, batched, strict=True):
        assert max_diff(one, many) <= 2


def test_sd3_without_t5_and_t5_loras_refused(
    start_server: Any, sd3: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``text_encoder_3=None`` (diffusers allows it: T5's part is zeros) serves as diffusers draws it;
    a T5 LoRA is refused with 422 saying so; a UNet sampler is 422 listing the flow-matching ones."""
    from basemodel.families.sd3.tiny import build_tiny_sd3_pipeline

    folder = tmp_path / "no-t5"
    build_tiny_sd3_pipeline(sd35=False, t5=False).save_pretrained(folder, safe_serialization=True)
    base = load_base_model(str(folder), tmp_path / "models", device="cpu", dtype="fp32")
    assert base.family.name == "sd3" and base.pipe.text_encoder_3 is None
    assert base.family.variant(base.pipe.transformer.config) == "sd3"
    server = start_server(loader=lambda _: base, store=str(tmp_path / "store"))
    assert max_diff(images(server), diffusers_reference(folder)) <= 1
    response = generate(server, scheduler="euler_a")
    assert response.status_code == 422 and "flow matching" in response.json()["error"]["message"]
    t5 = {"text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 64)}
    t5 |= {"text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(32, 4)}
    server.stop()
    server = start_server(loader=lambda _: sd3, store=str(tmp_path / "store"))
    with server.client() as http:
        response = http.post(
            "/v1/adapters", files={"file": ("t5.safetensors", save_bytes(t5))}, data={"id": "t5"}
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["detail"]["reason"] == "unsupported_component"
    assert "T5" in response.json()["error"]["message"]


def test_sd3_img2img_matches_its_pipeline(start_server: Any, sd3: BaseModel) -> None:
    """Image-to-image as ``StableDiffusion3Img2ImgPipeline`` (CFG, ``scale_noise``, strength not
    truncated); inpainting is 422 ``unsupported``."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    image = picture()
    server = start_server(loader=lambda _: sd3)
    for strength in (0.6, 0.3):
        ours = images(server, steps=4, init_image=b64(image), strength=strength, negative_prompt="blurry")
        pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(sd3.ref.path)
        pipe.set_progress_bar_config(disable=True)
        result = pipe(
            REQUEST["prompt"],
            negative_prompt="blurry",
            image=image,
            strength=strength,
            num_inference_steps=4,
            guidance_scale=REQUEST["guidance_scale"],
            generator=generators_for(REQUEST["seed"], 1),
            output_type="pil",
        )
        assert max_diff(ours, [np.asarray(i, dtype=np.int16) for i in result.images]) <= 1, strength
    response = generate(server, init_image=b64(image), mask_image=b64(image.convert("L")))
    assert response.status_code == 422 and response.json()["error"]["type"] == "unsupported", response.text
