"""DoRA adapters through the real server on tiny-sd: kohya/LyCORIS files (both axes, ComfyUI's scale
rule) and PEFT files (the weight inside the norm) equal a merged-by-hand reference — the DoRA weight
written into plain diffusers' modules, computed in the test — within 1/255 on the hooked and the fused
paths, and a mixed batch of DoRA rows (PEFT at two weights) and a LoRA row equals each request alone."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from adapters.registry import Registry
from tests.adapters import dora_factory as df
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.adapters.lycoris_factory import kohya_name
from tests.service.parity import assert_batch_equals_alone, draw, sd_pipeline, weights_written
from tests.service.test_hotswap import REQUEST, generate, pixels

SCALES = {"dora-in": 0.8, "dora-out": 1.0, "dora-peft": 0.6}


@pytest.fixture(scope="module")
def weights(base_model: Any) -> dict[str, torch.Tensor]:
    return df.base_weights(base_model.lora_components, df.SD1_TARGETS)


@pytest.fixture(scope="module")
def dora_files(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "dora-in": df.kohya_dora(weights, kohya_name, axis="in"),
        "dora-out": df.kohya_dora(weights, kohya_name, axis="out", seed=1),
        "dora-peft": df.peft_dora(weights, seed=2),
    }


def dora_weights(
    files: Mapping[str, dict[str, torch.Tensor]], weights: dict[str, torch.Tensor], name: str, scale: float
) -> dict[str, torch.Tensor]:
    names = None if name.endswith("peft") else kohya_name
    return df.reference_weights(files[name], weights, scale, names)


@cache
def _pipe(model_dir: Path) -> StableDiffusionPipeline:
    return sd_pipeline(model_dir)


def with_weights(model_dir: Path, replaced: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Plain diffusers with the given modules' weights replaced, run like the server runs a request."""
    pipe = _pipe(model_dir)
    with weights_written({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, replaced):
        return draw(pipe)


@pytest.mark.parametrize("path", ["hooked", "fused"])
def test_dora_matches_a_merged_by_hand_reference(
    path: str,
    start_server: Any,
    registry: Registry,
    weights: dict[str, torch.Tensor],
    dora_files: dict[str, dict[str, torch.Tensor]],
    tiny_model_dir: Path,
) -> None:
    for name, tensors in dora_files.items():
        registry.register(save_bytes(tensors), name)
    server = start_server(store=registry.store.uri, lora_path=path)
    base = pixels(generate(server)["images"][0])
    for name, scale in SCALES.items():
        body = generate(server, adapters=[{"id": name, "scale": scale}])
        assert body["adapters"][0]["sha256"] == registry.resolve(name).sha256
        served = pixels(body["images"][0])
        reference = with_weights(tiny_model_dir, dora_weights(dora_files, weights, name, scale))
        assert np.abs(served - reference).max() <= 1, name
        assert np.abs(served - base).mean() > 2, f"{name} changes the image"
    # The two rules at another weight: kohya linear (W + s·D), PEFT inside the norm.
    for name, scale in (("dora-in", 0.3), ("dora-peft", 1.0)):
        served = pixels(generate(server, adapters=[{"id": name, "scale": scale}])["images"][0])
        reference = with_weights(tiny_model_dir, dora_weights(dora_files, weights, name, scale))
        assert np.abs(served - reference).max() <= 1, (name, scale)


def test_mixed_batch_of_dora_and_lora_rows_equals_each_alone(
    start_server: Any, registry: Registry, base_model: Any, dora_files: dict[str, dict[str, torch.Tensor]]
) -> None:
    registry.register(save_bytes(dora_files["dora-in"]), "dora-in")
    registry.register(save_bytes(dora_files["dora-peft"]), "dora-peft")
    registry.register(save_bytes(diffusers_layout(make_case(base_model.pipe))), "style")
    requests = [
        {"prompt": "a red circle", "seed": 1, "adapters": [{"id": "dora-in", "scale": 0.8}]},
        {"prompt": "a blue square", "seed": 2, "adapters": [{"id": "style", "scale": 0.9}]},
        {"prompt": "a green star", "seed": 3, "adapters": [{"id": "dora-peft", "scale": 0.6}]},
        {"prompt": "a red circle", "seed": 4, "adapters": [{"id": "dora-peft", "scale": 1.0}]},
    ]
    assert_batch_equals_alone(start_server, requests, window_ms=2000, store=registry.store.uri)


def test_a_dora_without_direction_on_this_base_is_a_typed_error(
    start_server: Any, registry: Registry, weights: dict[str, torch.Tensor]
) -> None:
    """A file whose ΔW cancels a column of this base's W registers (registration sees shapes, not
    weights) but cannot load: 409 ``adapter_incompatible`` / ``dora_zero_norm``, and the server serves on."""
    module = df.SD1_TARGETS[0]
    w = weights[module]
    name = kohya_name(module)
    down = torch.zeros(1, w.shape[1])
    down[0, 3] = 1.0
    tensors = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": -w[:, 3:4].clone(),
        f"{name}.alpha": torch.tensor(1.0),
        f"{name}.dora_scale": torch.ones(1, w.shape[1]),
    }
    registry.register(save_bytes(tensors), "no-direction")
    server = start_server(store=registry.store.uri)
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, "adapters": [{"id": "no-direction"}]})
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["type"] == "adapter_incompatible" and error["detail"]["reason"] == "dora_zero_norm"
        assert http.post("/v1/generate", json=REQUEST).status_code == 200


def test_peft_dora_on_the_unet_equals_diffusers_load_lora_weights(
    start_server: Any,
    registry: Registry,
    weights: dict[str, torch.Tensor],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """An independent reference for the PEFT rule: diffusers' own ``load_lora_weights`` + ``set_adapters``
    (PEFT's ``use_dora`` layers) at weights 1.0 and 0.6. UNet modules only: diffusers 0.42 does not load a
    text encoder's ``lora_magnitude_vector`` (it re-initialises it from the base weight's norm)."""
    unet = {m: w for m, w in weights.items() if m.startswith("unet.")}
    tensors = df.peft_dora(unet, seed=6)
    path = tmp_path / "peft-dora.safetensors"
    path.write_bytes(save_bytes(tensors))
    registry.register(path.read_bytes(), "peft-unet")
    server = start_server(store=registry.store.uri)
    pipe = sd_pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(path), adapter_name="dora")
    for scale in (1.0, 0.6):
        served = pixels(generate(server, adapters=[{"id": "peft-unet", "scale": scale}])["images"][0])
        pipe.set_adapters(["dora"], [scale])
        assert np.abs(served - draw(pipe)).max() <= 1, scale
