"""A kohya sd-scripts Flux file (BFL names, fused qkv) served on tiny-flux-random through the real server,
against diffusers' ``FluxPipeline.load_lora_weights`` loading the same file (fp32, CPU, within 1/255).

The file holds what diffusers 0.42 converts on a model of any width: every double-block module (fused
img/txt qkv split in three, projections, MLPs, modulations, alpha 4 of rank 2) and the single blocks'
``linear2`` / ``modulation.lin``. diffusers' converter cannot split ``linear1`` of a model narrower than
Flux.1 (it hard-codes 3072 + 12288 rows) and drops the final layer's alpha — those are covered against
diffusers' own converters at Flux.1's width in ``tests/adapters/test_community_flux.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.families import get_family
from basemodel.loader import BaseModel, load_base_model
from basemodel.random_models import FLUX_RANDOM_NAME, ensure_random_tiny
from service.engine.sampler import generators_for
from tests.adapters.community_factory import kohya_lora
from tests.adapters.conftest import save_bytes
from tests.service.test_hotswap import pixels

REQUEST = {"prompt": "a red circle", "steps": 3, "guidance_scale": 3.5, "seed": 7}


@pytest.fixture(scope="module")
def flux(loraswap_home: Path) -> BaseModel:
    ensure_random_tiny(loraswap_home / "models", name=FLUX_RANDOM_NAME)
    return load_base_model(FLUX_RANDOM_NAME, loraswap_home / "models", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def kohya_file(flux: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = flux.architecture
    layout = get_family("flux").lora_layout(arch.unet_config or {})
    assert layout is not None
    names = [
        n for n in layout.kohya if n.startswith("double_blocks.") or n.endswith(("linear2", "modulation.lin"))
    ]
    tensors = kohya_lora(layout.kohya, arch, names, alpha=4.0, seed=3)
    path = tmp_path_factory.mktemp("flux-kohya") / "style.safetensors"
    path.write_bytes(
        save_bytes({k: v * 3 if k.endswith("lora_up.weight") else v for k, v in tensors.items()})
    )
    return path


def images(server: Any, **overrides: Any) -> list[np.ndarray]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, **overrides})
    assert response.status_code == 200, response.text
    return [pixels(image) for image in response.json()["images"]]


def diffusers_reference(model_dir: Path, lora: Path | None, scale: float) -> list[np.ndarray]:
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="a")
        pipe.set_adapters(["a"], [scale])
    result = pipe(
        REQUEST["prompt"],
        num_inference_steps=REQUEST["steps"],
        guidance_scale=REQUEST["guidance_scale"],
        width=32,
        height=32,  # the engine's native size: the VAE's sample size
        generator=generators_for(REQUEST["seed"], 1),
        output_type="pil",
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def max_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def test_flux_kohya_file_serves_like_load_lora_weights(
    start_server: Any, flux: BaseModel, kohya_file: Path, tmp_path: Path
) -> None:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(flux))
    version = registry.register(kohya_file, "flux-kohya")
    assert version.source_format == "kohya" and version.components == ["transformer"]
    server = start_server(loader=lambda _: flux, store=registry.store.uri)
    plain = images(server)
    ours = images(server, adapters=[{"id": "flux-kohya", "scale": 0.8}])
    assert max_diff(ours, diffusers_reference(flux.ref.path, kohya_file, 0.8)) <= 1
    assert max_diff(ours, plain) > 10, "the adapter must visibly change the image"


def test_flux_loha_on_fused_modules_serves_like_the_merged_weights(
    start_server: Any, flux: BaseModel, tmp_path: Path
) -> None:
    """A LyCORIS LoHa under kohya Flux names on the fused ``img_attn.qkv`` and ``linear1``: served through
    the dense path, it draws what FluxPipeline draws with ``W + ΔW`` written into the weights by hand
    (ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / rank, its rows cut in BFL order q, k, v(, MLP))."""
    gen = torch.Generator().manual_seed(12)
    pipe_modules = dict(flux.pipe.transformer.named_modules())
    fused = {
        "double_blocks_0_img_attn_qkv": [
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v",
        ],
        "single_blocks_0_linear1": [f"single_transformer_blocks.0.attn.to_{p}" for p in "qkv"]
        + ["single_transformer_blocks.0.proj_mlp"],
    }
    tensors: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for name, parts in fused.items():
        rows = [pipe_modules[p].weight.shape[0] for p in parts]
        width = pipe_modules[parts[0]].weight.shape[1]
        f = {
            "hada_w1_a": torch.randn(sum(rows), 2, generator=gen),
            "hada_w1_b": torch.randn(2, width, generator=gen),
            "hada_w2_a": torch.randn(sum(rows), 2, generator=gen),
            "hada_w2_b": torch.randn(2, width, generator=gen) / width**0.5,
        }
        tensors |= {f"lora_unet_{name}.{role}": t for role, t in f.items()}
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 2.0
        for part, chunk in zip(parts, torch.split(delta, rows), strict=True):
            merged[part] = chunk
    path = tmp_path / "loha.safetensors"
    path.write_bytes(save_bytes(tensors))
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(flux))
    version = registry.register(path, "flux-loha")
    assert version.kind == "loha" and version.num_modules == 7
    server = start_server(loader=lambda _: flux, store=registry.store.uri)
    ours = images(server, adapters=[{"id": "flux-loha", "scale": 1.0}])

    pipe = FluxPipeline.from_pretrained(flux.ref.path)
    pipe.set_progress_bar_config(disable=True)
    modules = dict(pipe.transformer.named_modules())
    with torch.no_grad():
        for part, delta in merged.items():
            modules[part].weight += delta
    result = pipe(
        REQUEST["prompt"],
        num_inference_steps=REQUEST["steps"],
        guidance_scale=REQUEST["guidance_scale"],
        width=32,
        height=32,
        generator=generators_for(REQUEST["seed"], 1),
        output_type="pil",
    )
    assert max_diff(ours, [np.asarray(image, dtype=np.int16) for image in result.images]) <= 1
    assert max_diff(ours, images(server)) > 10
