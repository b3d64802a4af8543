"""DoRA files on tiny-flux-random and tiny-sd3-random through the real server: kohya/LyCORIS files on the
original model's fused modules (Flux ``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1``, SD3 joint-block
qkv and SD3.5's ``attn2.qkv``, both axes) and PEFT files with diffusers names equal a merged-by-hand
reference — FluxPipeline / StableDiffusion3Pipeline with the DoRA weight written into its modules, computed
in the test from the fused weight (``dora_factory``) — within 1/255 on the hooked and fused paths at
weight 1 and another weight; a mixed batch of DoRA and LoRA rows equals each request alone (≤2/255)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusion3Pipeline

from adapters.identity import BaseIdentity
from adapters.merge import MergeItem, merge_adapters
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.loader import BaseModel, load_base_model
from basemodel.random_models import FLUX_RANDOM_NAME, SD3_RANDOM_NAME, ensure_random_tiny
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters import dora_factory as df
from tests.adapters.conftest import save_bytes
from tests.service.parity import assert_batch_equals_alone, weights_written
from tests.service.test_hotswap import pixels

REQUESTS = {
    "flux": {"prompt": "a red circle", "steps": 2, "guidance_scale": 3.5, "seed": 7},
    "sd3": {"prompt": "a red circle", "steps": 2, "guidance_scale": 5.0, "seed": 9},
}
MODELS = {"flux": FLUX_RANDOM_NAME, "sd3": SD3_RANDOM_NAME}
SOURCES = {"flux": df.flux_sources(double=0, single=0), "sd3": df.sd3_sources(block=0, dual=True)}
# (file, weight): each rule at 1 and at another weight
CHECKS = {
    "hooked": [("kohya-in", 1.0), ("kohya-in", 0.6), ("kohya-out", 1.0), ("peft", 1.0), ("peft", 0.6)],
    "fused": [("kohya-in", 0.6), ("kohya-out", 1.0), ("peft", 0.6)],
}


@cache
def _model(name: str, models: Path) -> BaseModel:
    ensure_random_tiny(models, name=MODELS[name])
    return load_base_model(MODELS[name], models, device="cpu", dtype="fp32")


@cache
def _pipe(name: str, model_dir: Path) -> Any:
    if name == "flux":
        pipe = FluxPipeline.from_pretrained(model_dir)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config, flow_matching=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Family:
    """One family's tiny model, its DoRA files (kohya on the fused modules along both axes, PEFT with
    diffusers names) and the merged-by-hand reference."""

    def __init__(self, name: str, models: Path) -> None:
        self.name = name
        self.model = _model(name, models)
        self.sources = SOURCES[name]
        modules = [m for parts in self.sources.values() for m in parts]
        self.weights = df.base_weights(self.model.lora_components, modules)
        fused = df.fused_weights(self.weights, self.sources)
        self.files = {
            "kohya-in": df.kohya_dora(fused, lambda source: source, axis="in", seed=1),
            "kohya-out": df.kohya_dora(fused, lambda source: source, axis="out", seed=2),
            "peft": df.peft_dora(self.weights, seed=3),
        }

    def reference_weights(self, file: str, scale: float) -> dict[str, torch.Tensor]:
        if file == "peft":
            return df.reference_weights(self.files[file], self.weights, scale)
        return df.fused_reference(self.files[file], self.weights, self.sources, scale)

    def registry(self, root: Path) -> Registry:
        registry = Registry(open_store(str(root / "store")), BaseIdentity.from_base_model(self.model))
        for file, tensors in self.files.items():
            version = registry.register(save_bytes(tensors), file)
            assert version.kind == "dora" and version.components == ["transformer"]
        return registry

    def with_weights(self, replaced: Mapping[str, torch.Tensor], **overrides: Any) -> np.ndarray:
        """The request in plain diffusers with the given modules' weights written in by hand."""
        request = {**REQUESTS[self.name], **overrides}
        pipe = _pipe(self.name, self.model.ref.path)
        with weights_written({"transformer": pipe.transformer}, replaced):
            image = pipe(
                request["prompt"],
                num_inference_steps=request["steps"],
                guidance_scale=request["guidance_scale"],
                width=32,
                height=32,
                generator=generators_for(request["seed"], 1),
                output_type="pil",
            ).images[0]
        return np.asarray(image, dtype=np.int16)


@cache
def _family(name: str, models: Path) -> Family:
    return Family(name, models)


def generate(server: Any, request: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**request, **overrides})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("path", ["hooked", "fused"])
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_transformer_dora_matches_a_merged_by_hand_reference(
    name: str, path: str, start_server: Any, loraswap_home: Path, tmp_path: Path
) -> None:
    family = _family(name, loraswap_home / "models")
    registry = family.registry(tmp_path)
    server = start_server(loader=lambda _: family.model, store=registry.store.uri, lora_path=path)
    request = REQUESTS[name]
    base = pixels(generate(server, request)["images"][0])
    for file, scale in CHECKS[path]:
        body = generate(server, request, adapters=[{"id": file, "scale": scale}])
        assert body["lora_path"] == path
        served = pixels(body["images"][0])
        reference = family.with_weights(family.reference_weights(file, scale))
        assert np.abs(served - reference).max() <= 1, (file, scale)
        # visibly (normalising each part of a fused module alone is 8/255 (SD3) to 18/255 (Flux) off)
        assert np.abs(served - base).max() > 3, f"{file} changes the image"


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_mixed_batch_of_transformer_dora_and_lora_rows_equals_each_alone(
    name: str, start_server: Any, loraswap_home: Path, tmp_path: Path
) -> None:
    family = _family(name, loraswap_home / "models")
    registry = family.registry(tmp_path)
    gen = torch.Generator().manual_seed(4)
    lora = {}
    for module, weight in family.weights.items():
        lora[f"{module}.lora_A.weight"] = torch.randn(2, weight.shape[1], generator=gen) * 0.3
        lora[f"{module}.lora_B.weight"] = torch.randn(weight.shape[0], 2, generator=gen) * 0.3
    registry.register(save_bytes(lora), "style")
    request = REQUESTS[name]
    requests = [
        {**request, "prompt": "a red circle", "seed": 1, "adapters": [{"id": "kohya-in", "scale": 0.8}]},
        {**request, "prompt": "a blue square", "seed": 2, "adapters": [{"id": "style", "scale": 0.9}]},
        {**request, "prompt": "a green star", "seed": 3, "adapters": [{"id": "peft", "scale": 0.6}]},
        {**request, "prompt": "a red circle", "seed": 4, "adapters": [{"id": "kohya-out", "scale": 1.0}]},
    ]

    def preload(server: Any) -> None:
        with server.client() as http:
            for file in ("kohya-in", "style", "peft", "kohya-out"):
                assert http.post(f"/v1/adapters/{file}/preload").status_code == 200

    assert_batch_equals_alone(
        start_server,
        requests,
        window_ms=2000,
        send=generate,
        warm=preload,
        loader=lambda _: family.model,
        store=registry.store.uri,
    )


def test_merge_bakes_a_fused_dora_in(loraswap_home: Path, tmp_path: Path) -> None:
    """``adapters merge`` of a kohya DoRA on Flux's fused modules: the merged folder's transformer holds
    ``W'`` of the fused weights, split (merging mutates its base: a fresh one)."""
    family = _family("flux", loraswap_home / "models")
    registry = family.registry(tmp_path)
    base = load_base_model(MODELS["flux"], loraswap_home / "models", device="cpu", dtype="fp32")
    output = tmp_path / "merged"
    merge_adapters(registry, base, [MergeItem("kohya-in", 0.6)], output, dtype="fp32", progress=False)
    merged = dict(FluxTransformer2DModel.from_pretrained(output / "transformer").named_modules())
    for module, want in family.reference_weights("kohya-in", 0.6).items():
        got = merged[module.removeprefix("transformer.")].weight.detach().double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), module
