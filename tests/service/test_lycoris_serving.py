"""LoHa, LoKr and full-diff adapters through the real server: each equals a merged-by-hand reference
(base weights + ΔW computed in the test from the LyCORIS formulas) within 1/255, and a mixed batch of
a LoHa row and a LoRA row equals each served alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapters.registry import Registry
from tests.adapters import lycoris_factory as lf
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.parity import assert_batch_equals_alone, draw, sd_pipeline
from tests.service.test_hotswap import REQUEST, generate, pixels


def shapes_of(base_model: Any) -> dict[str, tuple[int, ...]]:
    return dict(base_model.architecture.modules)


def biased_of(base_model: Any) -> set[str]:
    components = base_model.lora_components
    return {
        m
        for m in lf.TARGETS
        if components[m.split(".", 1)[0]].get_submodule(m.split(".", 1)[1]).bias is not None
    }


@pytest.fixture(scope="module")
def lycoris_files(base_model: Any) -> dict[str, dict[str, torch.Tensor]]:
    shapes = shapes_of(base_model)
    return {
        "hada": lf.loha_file(shapes, tucker=True),
        "kron": lf.lokr_file(shapes),
        "full": lf.full_file(shapes, biased_of(base_model)),
    }


def merged_by_hand(
    model_dir: Path,
    parts: list[tuple[dict[str, torch.Tensor], float]],
    shapes: dict[str, tuple[int, ...]],
) -> np.ndarray:
    """Plain diffusers with ``W + Σ scale·ΔW`` (ΔW from ``lycoris_factory.reference_deltas``) written into
    the weights, run like the server runs a request (DDIM, diffusers' seeding)."""
    pipe = sd_pipeline(model_dir)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        for tensors, scale in parts:
            for module, (delta, bias) in lf.reference_deltas(tensors, shapes).items():
                component, path = module.split(".", 1)
                target = components[component].get_submodule(path)
                target.weight += (scale * delta).to(target.weight.dtype)
                if bias is not None:
                    target.bias += (scale * bias).to(target.bias.dtype)
    return draw(pipe)


def test_lycoris_kinds_match_a_merged_by_hand_reference(
    start_server: Any,
    registry: Registry,
    base_model: Any,
    lycoris_files: dict[str, dict[str, torch.Tensor]],
    tiny_model_dir: Path,
) -> None:
    for name, tensors in lycoris_files.items():
        registry.register(save_bytes(tensors), name)
    server = start_server(store=registry.store.uri)
    base = pixels(generate(server)["images"][0])
    shapes = shapes_of(base_model)
    for name, tensors in lycoris_files.items():
        body = generate(server, adapters=[{"id": name, "scale": 0.8}])
        assert body["adapters"][0]["sha256"] == registry.resolve(name).sha256
        served = pixels(body["images"][0])
        reference = merged_by_hand(tiny_model_dir, [(tensors, 0.8)], shapes)
        assert np.abs(served - reference).max() <= 1, name
        assert np.abs(served - base).mean() > 2, f"{name} changes the image"  # the delta is applied at all
    # LoHa and LoKr composed with weights, as one request.
    body = generate(server, adapters=[{"id": "hada", "scale": 0.5}, {"id": "kron", "scale": -0.7}])
    reference = merged_by_hand(
        tiny_model_dir, [(lycoris_files["hada"], 0.5), (lycoris_files["kron"], -0.7)], shapes
    )
    assert np.abs(pixels(body["images"][0]) - reference).max() <= 1


def test_mixed_batch_of_loha_and_lora_rows_equals_each_alone(
    start_server: Any, registry: Registry, base_model: Any, lycoris_files: dict[str, dict[str, torch.Tensor]]
) -> None:
    registry.register(save_bytes(lycoris_files["hada"]), "hada")
    registry.register(save_bytes(diffusers_layout(make_case(base_model.pipe))), "style")
    requests = [
        {"prompt": "a red circle", "seed": 1, "adapters": [{"id": "hada", "scale": 0.8}]},
        {"prompt": "a blue square", "seed": 2, "adapters": [{"id": "style", "scale": 0.9}]},
    ]
    assert_batch_equals_alone(start_server, requests, window_ms=1500, store=registry.store.uri)


def test_device_bytes_count_the_dense_delta(
    base_model: Any, lycoris_files: dict[str, dict[str, torch.Tensor]]
) -> None:
    from adapters.normalise import normalise
    from service.lora.layers import DenseDelta
    from service.lora.model_manager import LoRAModelManager
    from service.lora.weights import DeviceAdapter

    manager = LoRAModelManager(base_model.lora_components)
    try:
        for tensors in lycoris_files.values():
            canonical, info = normalise(tensors, base_model.architecture)
            adapter = DeviceAdapter.build("x", canonical, manager.targets, torch.device("cpu"), torch.float32)
            dense = sum(
                int(torch.Size(s).numel()) * 4 for s in (shapes_of(base_model)[m] for m in lf.TARGETS)
            )
            assert all(isinstance(layer, DenseDelta) for layer in adapter.modules.values())
            assert adapter.nbytes >= dense  # ΔW per module, plus the factors (a full diff's are ΔW itself)
            if info.kind == "full":
                assert adapter.nbytes == sum(t.nbytes for t in canonical.values())
            for module, layer in adapter.modules.items():
                assert layer.dense_delta().dtype == torch.float32
                assert tuple(layer.dense_delta().shape) == shapes_of(base_model)[module]
    finally:
        manager.remove()


def test_http_upload_of_lycoris_files(start_server: Any, base_model: Any, tmp_path: Path) -> None:
    """A LoKr uploads as its own kind; malformed and mixed LyCORIS files are typed 4xx, nothing stored."""
    shapes = shapes_of(base_model)
    store = tmp_path / "store"
    server = start_server(store=str(store))
    name = lf.kohya_name(lf.TARGETS[0])
    loha = lf.loha_file(shapes, targets=lf.TARGETS[:2])
    bad = {
        "shape": ({**loha, f"{name}.hada_w1_b": torch.zeros(lf.RANK, 7)}, 409, "shape_mismatch"),
        "mixed": (
            {**loha, **{k: v for k, v in lf.lokr_file(shapes).items() if lf.kohya_name(lf.TARGETS[3]) in k}},
            422,
            "mixed_adapter_kinds",
        ),
        "dora": ({**loha, f"{name}.dora_scale": torch.ones(64, 1)}, 422, "unsupported_adapter_type"),
    }

    def upload(http: Any, data: bytes, adapter_id: str) -> Any:
        files = {"file": ("a.safetensors", data, "application/octet-stream")}
        return http.post("/v1/adapters", files=files, data={"id": adapter_id})

    with server.client() as http:
        for case, (tensors, status, reason) in bad.items():
            response = upload(http, save_bytes(tensors), "bad")
            assert response.status_code == status, (case, response.text)
            assert response.json()["error"]["detail"]["reason"] == reason
        assert http.get("/v1/adapters").json() == {"adapters": []}
        assert not (store / "blobs").exists() or not list((store / "blobs").rglob("*.safetensors"))
        created = upload(http, save_bytes(lf.lokr_file(shapes)), "kron")
        assert created.status_code == 201, created.text
        assert created.json()["kind"] == "lokr"
        served = http.post("/v1/generate", json={**REQUEST, "adapters": [{"id": "kron"}]})
        assert served.status_code == 200, served.text


def test_a_full_diff_with_bias_runs_hooked_even_when_fusing_is_forced(
    start_server: Any,
    registry: Registry,
    base_model: Any,
    lycoris_files: dict[str, dict[str, torch.Tensor]],
    tiny_model_dir: Path,
) -> None:
    """Fusing swaps weights only: a set whose layers change biases (``diff_b``) must not lose them."""
    tensors = {k: v * 10 if k.endswith(".diff_b") else v for k, v in lycoris_files["full"].items()}
    assert any(k.endswith(".diff_b") and k.startswith("lora_unet") for k in tensors)
    registry.register(save_bytes(tensors), "full-b")
    server = start_server(store=registry.store.uri, lora_path="fused")
    body = generate(server, adapters=[{"id": "full-b", "scale": 0.8}])
    assert body["lora_path"] == "hooked"
    reference = merged_by_hand(tiny_model_dir, [(tensors, 0.8)], shapes_of(base_model))
    assert np.abs(pixels(body["images"][0]) - reference).max() <= 1
