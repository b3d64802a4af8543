"""Helpers shared by the transformer-family server tests (``test_flux.py``, ``test_sd3.py``): PEFT
LoRAs made on a loaded base, a store holding them, requests over HTTP with a file's base request, and
the pixel distance the diffusers-parity checks use. The models themselves are ``tests/service/conftest.py``'s
``flux`` and ``sd3`` fixtures."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.loader import BaseModel
from tests.adapters.conftest import save_bytes
from tests.service.test_hotswap import pixels


def peft_lora(base: BaseModel, targets: Mapping[str, list[str]], seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 PEFT LoRA on ``targets`` (component → module names) with random halves (``lora_B`` × 4,
    so that it visibly changes the image), keys prefixed with the component as diffusers saves them."""
    torch.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, names in targets.items():
        model = copy.deepcopy(base.lora_components[component])
        config = LoraConfig(r=4, lora_alpha=4, target_modules=names, init_lora_weights=False)
        inject_adapter_in_model(config, model)
        state = get_peft_model_state_dict(model).items()
        tensors |= {f"{component}.{k}": v.detach() * (4.0 if ".lora_B." in k else 1.0) for k, v in state}
    return tensors


def save_loras(folder: Path, files: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Path]:
    """``<name>.safetensors`` in ``folder`` for each name → tensors."""
    for name, content in files.items():
        (folder / f"{name}.safetensors").write_bytes(save_bytes(dict(content)))
    return {name: folder / f"{name}.safetensors" for name in files}


def store_with(base: BaseModel, files: Mapping[str, Path], folder: Path) -> str:
    """A local store in ``folder`` with each file registered under its name, for ``base``; its URI."""
    registry = Registry(open_store(str(folder)), BaseIdentity.from_base_model(base))
    for name, path in files.items():
        registry.register(path, name)
    return registry.store.uri


def generate(server: Any, base_request: Mapping[str, Any], **overrides: Any) -> httpx.Response:
    with server.client() as http:
        return http.post("/v1/generate", json={**base_request, **overrides})


def images(server: Any, base_request: Mapping[str, Any], **overrides: Any) -> list[np.ndarray]:
    response = generate(server, base_request, **overrides)
    assert response.status_code == 200, response.text
    return [pixels(image) for image in response.json()["images"]]


def max_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    """The largest per-channel difference over the images (0..255), equal counts required."""
    assert len(ours) == len(theirs)
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
