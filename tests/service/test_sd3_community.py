"""A kohya sd-scripts SD3.5 file (SGM names: ``lora_unet_joint_blocks_…``, fused qkv, dual attention,
``lora_te1_``/``lora_te2_``) served on tiny-sd3-random through the real server.

diffusers loads such a file with no effect at all (sd-scripts issue 1743): ``load_lora_weights`` of the
kohya file draws the plain image. loraswap reads it exactly: served, it draws what diffusers draws when
it loads the same LoRA converted to the diffusers layout (``adapters convert --to diffusers``), and
visibly not the plain image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusion3Pipeline

from adapters.format import write_adapter
from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.families import get_family
from basemodel.loader import BaseModel, load_base_model
from basemodel.random_models import SD3_RANDOM_NAME, ensure_random_tiny
from service.engine.sampler import generators_for
from tests.adapters.community_factory import kohya_lora
from tests.adapters.conftest import save_bytes
from tests.service.test_hotswap import pixels

REQUEST = {"prompt": "a red circle", "steps": 3, "guidance_scale": 5.0, "seed": 9}


@pytest.fixture(scope="module")
def sd3(loraswap_home: Path) -> BaseModel:
    ensure_random_tiny(loraswap_home / "models", name=SD3_RANDOM_NAME)
    return load_base_model(SD3_RANDOM_NAME, loraswap_home / "models", device="cpu", dtype="fp32")


def images(server: Any, **overrides: Any) -> list[np.ndarray]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, **overrides})
    assert response.status_code == 200, response.text
    return [pixels(image) for image in response.json()["images"]]


def diffusers_reference(model_dir: Path, lora: Path | None, size: int) -> list[np.ndarray]:
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="a")
    result = pipe(
        REQUEST["prompt"],
        num_inference_steps=REQUEST["steps"],
        guidance_scale=REQUEST["guidance_scale"],
        width=size,
        height=size,
        generator=generators_for(REQUEST["seed"], 1),
        output_type="pil",
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def max_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def test_sd3_kohya_file_has_its_effect(start_server: Any, sd3: BaseModel, tmp_path: Path) -> None:
    arch = sd3.architecture
    layout = get_family("sd3").lora_layout(arch.unet_config or {})
    assert layout is not None
    tensors = kohya_lora(layout.kohya, arch, list(layout.kohya), alpha=4.0, seed=4)
    kohya = tmp_path / "sd3-kohya.safetensors"
    kohya.write_bytes(
        save_bytes({k: v * 3 if k.endswith("lora_up.weight") else v for k, v in tensors.items()})
    )
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(sd3))
    version = registry.register(kohya, "sd3-kohya")
    assert version.source_format == "kohya" and version.components == ["transformer"]
    converted = tmp_path / "sd3-diffusers.safetensors"
    loaded = registry.open("sd3-kohya")
    write_adapter(converted, loaded.tensors, loaded.metadata, arch)

    server = start_server(loader=lambda _: sd3, store=registry.store.uri)
    plain = images(server)
    ours = images(server, adapters=[{"id": "sd3-kohya", "scale": 1.0}])
    size = ours[0].shape[0]
    assert max_diff(ours, plain) > 10, "the kohya file must visibly change the image"
    assert max_diff(ours, diffusers_reference(sd3.ref.path, converted, size)) <= 1
    # diffusers itself reads nothing from the kohya file: the plain image
    assert max_diff(plain, diffusers_reference(sd3.ref.path, kohya, size)) <= 1
