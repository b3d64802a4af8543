"""Per-request LoRA through the real server: parity with diffusers, isolation, batching, versions."""

from __future__ import annotations

import base64
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.registry import Registry
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, kohya_layout, ldm_kohya_layout, make_case
from tests.service.test_lifecycle import metric_samples, value

REQUEST = {
    "prompt": "a red circle",
    "negative_prompt": "blurry",
    "steps": 4,
    "guidance_scale": 6.0,
    "seed": 5,
}


@pytest.fixture(scope="module")
def lora_files(base_model: Any) -> dict[str, bytes]:
    """Two different peft LoRAs (UNet incl. LoCon + text encoder), a UNet-only kohya file, and a kohya
    file in LDM/SGM names with text-encoder MLP keys (diffusers drops kohya text attention keys)."""
    case = make_case(base_model.pipe)
    first = diffusers_layout(case)
    second = {k: (-0.5 * v if ".lora_B." in k else v) for k, v in first.items()}
    kohya = kohya_layout(case)
    kohya_unet = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
    ldm = ldm_kohya_layout(kohya, base_model.pipe.unet.config)
    ldm = {k: v for k, v in ldm.items() if k.startswith("lora_unet_") or "_mlp_" in k}
    return {
        "style": save_bytes(first),
        "other": save_bytes(second),
        "kohya": save_bytes(kohya_unet),
        "kohya-ldm": save_bytes(ldm),
    }


def pixels(image: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))), dtype=np.int16)


def generate(server: Any, **overrides: Any) -> dict[str, Any]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, **overrides})
    assert response.status_code == 200, response.text
    return response.json()


def diffusers_reference(
    model_dir: Path, files: list[tuple[Path, str, float]], *, sgm_names: bool = False, **overrides: Any
) -> np.ndarray:
    """The same request in plain diffusers with load_lora_weights + set_adapters.

    ``sgm_names``: pass the UNet config, as diffusers' SDXL pipeline does itself, so that its loader
    maps kohya LDM/SGM names (``lora_unet_input_blocks_…``); the SD1 pipeline does not do it alone.
    """
    from tests.service.parity import draw, sd_pipeline  # here: parity imports this module

    pipe = sd_pipeline(model_dir)
    extra = {"unet_config": pipe.unet.config} if sgm_names else {}
    for path, name, _ in files:
        pipe.load_lora_weights(str(path), adapter_name=name, **extra)
    pipe.set_adapters([name for _, name, _ in files], [weight for _, _, weight in files])
    return draw(pipe, **overrides)


def stored_file(registry: Registry, ref: str, tmp_path: Path) -> Path:
    version = registry.resolve(ref)
    path = tmp_path / f"{version.adapter_id}-{version.version}.safetensors"
    path.write_bytes(registry.read_blob(version))
    return path


def test_single_adapter_matches_diffusers(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes], tiny_model_dir: Path, tmp_path: Path
) -> None:
    registry.register(lora_files["style"], "style")
    server = start_server(store=registry.store.uri)
    body = generate(server, adapters=[{"id": "style", "scale": 0.7}])
    assert body["adapters"][0]["id"] == "style"
    assert body["adapters"][0]["version"] == 1
    assert body["adapters"][0]["sha256"] == registry.resolve("style").sha256
    assert body["adapters"][0]["scale"] == 0.7
    reference = diffusers_reference(
        tiny_model_dir, [(stored_file(registry, "style", tmp_path), "style", 0.7)]
    )
    ours = pixels(body["images"][0])
    assert np.abs(ours - reference).max() <= 1
    plain = pixels(generate(server)["images"][0])
    assert np.abs(ours - plain).max() > 10, "the adapter must visibly change the image"


def test_two_adapters_compose_like_set_adapters(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes], tiny_model_dir: Path, tmp_path: Path
) -> None:
    registry.register(lora_files["style"], "style")
    registry.register(lora_files["other"], "other")
    server = start_server(store=registry.store.uri)
    body = generate(server, adapters=[{"id": "style", "scale": 0.6}, {"id": "other", "scale": 0.3}])
    files = [
        (stored_file(registry, "style", tmp_path), "style", 0.6),
        (stored_file(registry, "other", tmp_path), "other", 0.3),
    ]
    assert np.abs(pixels(body["images"][0]) - diffusers_reference(tiny_model_dir, files)).max() <= 1


def test_kohya_file_matches_diffusers_loading_it(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # UNet-only: diffusers 0.42 + transformers 5 drops kohya text-encoder attention keys (docs/adapters.md)
    kohya = tmp_path / "kohya.safetensors"
    kohya.write_bytes(lora_files["kohya"])
    registry.register(kohya, "kohya")
    server = start_server(store=registry.store.uri)
    body = generate(server, adapters=[{"id": "kohya", "scale": 0.8}])
    reference = diffusers_reference(tiny_model_dir, [(kohya, "k", 0.8)])
    assert np.abs(pixels(body["images"][0]) - reference).max() <= 1


def test_ldm_named_kohya_file_matches_diffusers_loading_it(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An SD1 kohya file with LDM/SGM UNet names (refused before issue 11) + lora_te_ keys serves like
    diffusers loading the same file."""
    ldm = tmp_path / "kohya-ldm.safetensors"
    ldm.write_bytes(lora_files["kohya-ldm"])
    version = registry.register(ldm, "ldm")
    assert version.source_format == "kohya"
    assert version.components == ["text_encoder", "unet"]
    server = start_server(store=registry.store.uri)
    body = generate(server, adapters=[{"id": "ldm", "scale": 0.8}])
    reference = diffusers_reference(tiny_model_dir, [(ldm, "k", 0.8)], sgm_names=True)
    ours = pixels(body["images"][0])
    assert np.abs(ours - reference).max() <= 1
    assert np.abs(ours - pixels(generate(server)["images"][0])).max() > 10, "the adapter must act"


def test_prompt_tag_equals_adapters_field(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    server = start_server(store=registry.store.uri)
    tagged = generate(server, prompt="a red <lora:style:0.5> circle")
    listed = generate(server, prompt="a red circle", adapters=[{"id": "style", "scale": 0.5}])
    assert tagged["parameters"]["prompt"] == "a red circle"
    assert tagged["adapters"] == listed["adapters"]
    assert tagged["images"][0]["png_base64"] == listed["images"][0]["png_base64"]


def test_scale_default_from_registration(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style", scale_default=0.25)
    server = start_server(store=registry.store.uri)
    defaulted = generate(server, adapters=[{"id": "style"}])
    explicit = generate(server, adapters=[{"id": "style", "scale": 0.25}])
    assert defaulted["adapters"][0]["scale"] == 0.25
    assert defaulted["images"][0]["png_base64"] == explicit["images"][0]["png_base64"]


def test_no_state_leaks_after_many_swaps(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    registry.register(lora_files["other"], "other")
    small = {"steps": 1, "width": 32, "height": 32, "seed": 9}
    fresh = start_server(store=registry.store.uri)
    baseline = generate(fresh, **small)["images"][0]["png_base64"]
    fresh.stop()
    server = start_server(store=registry.store.uri, adapter_cache_device_mb=1)
    rng = random.Random(0)
    choices = [[], [{"id": "style"}], [{"id": "other", "scale": -1.0}], [{"id": "style"}, {"id": "other"}]]
    with server.client() as http:
        for _ in range(120):
            adapters = rng.choice(choices)
            response = http.post("/v1/generate", json={**REQUEST, **small, "adapters": adapters})
            assert response.status_code == 200
    assert generate(server, **small)["images"][0]["png_base64"] == baseline


def test_mixed_batch_equals_requests_served_alone(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    registry.register(lora_files["other"], "other")
    requests = [
        {"prompt": "a red circle", "seed": 1, "adapters": [{"id": "style", "scale": 0.8}]},
        {"prompt": "a blue square", "seed": 2, "guidance_scale": 4.0, "adapters": [{"id": "other"}]},
        {"prompt": "a green star", "seed": 3, "num_images": 2},
        {
            "prompt": "a star",
            "seed": 4,
            "adapters": [{"id": "style", "scale": 0.3}, {"id": "other", "scale": 1.0}],
        },
    ]
    alone_server = start_server(store=registry.store.uri, max_batch_size=1)
    alone = [generate(alone_server, **r) for r in requests]
    alone_server.stop()
    server = start_server(store=registry.store.uri, max_batch_size=4, batch_window_ms=1500)
    for r in requests:  # make every adapter resident, so the batch is not split by cold loads
        generate(server, **{**r, "steps": 1})
    with ThreadPoolExecutor(max_workers=4) as pool:
        batched = list(pool.map(lambda r: generate(server, **r), requests))
    samples = metric_samples(server)
    batch_counts = {s.labels["le"]: s.value for s in samples["loraswap_batch_size_bucket"]}
    assert batch_counts["1.0"] < value(samples, "loraswap_batch_size_count"), "no request was batched"
    for one, many in zip(alone, batched, strict=True):
        assert one["adapters"] == many["adapters"]
        for a, b in zip(one["images"], many["images"], strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_new_versions_are_picked_up_and_pins_still_work(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    # latest_ttl_s=0: every 'latest' request asks the store (the TTL: tests/reliability/test_store_outage.py)
    server = start_server(store=registry.store.uri, latest_ttl_s=0)
    first = generate(server, adapters=[{"id": "style"}])
    assert first["adapters"][0]["version"] == 1
    registry.register(lora_files["other"], "style")  # another process registers v2 in the store
    second = generate(server, adapters=[{"id": "style"}])
    assert second["adapters"][0]["version"] == 2
    assert second["images"][0]["png_base64"] != first["images"][0]["png_base64"]
    pinned = generate(server, adapters=[{"id": "style", "version": 1}])
    assert pinned["adapters"][0]["version"] == 1
    assert pinned["images"][0]["png_base64"] == first["images"][0]["png_base64"]
    registry.delete("style@1")
    with server.client() as http:
        gone = http.post("/v1/generate", json={**REQUEST, "adapters": [{"id": "style", "version": 1}]})
    assert gone.status_code == 404


def test_incompatible_adapter_is_409_before_any_work(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes], tmp_path: Path
) -> None:
    version = registry.register(lora_files["style"], "style")
    record = tmp_path / "store" / "adapters" / "style" / "versions" / "1.json"
    data = json.loads(record.read_text())
    data["base_model"]["architecture_id"] = "0" * 64  # as if registered against another architecture
    record.write_text(json.dumps(data))
    server = start_server(store=registry.store.uri)
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, "adapters": [{"id": "style"}]})
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "adapter_incompatible"
    samples = metric_samples(server)
    assert value(samples, "loraswap_images_generated_total") == 0
    assert version.version == 1


def test_strict_base_refuses_other_checkpoints(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes], tmp_path: Path
) -> None:
    registry.register(lora_files["style"], "style")
    record = tmp_path / "store" / "adapters" / "style" / "versions" / "1.json"
    data = json.loads(record.read_text())
    data["base_model"]["fingerprint"] = "f" * 64
    record.write_text(json.dumps(data))
    lenient = start_server(store=registry.store.uri)
    assert generate(lenient, adapters=[{"id": "style"}])["adapters"][0]["version"] == 1
    strict = start_server(store=registry.store.uri, strict_base=True)
    with strict.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, "adapters": [{"id": "style"}]})
    assert response.status_code == 409


def test_concurrent_cold_requests_share_one_load(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    server = start_server(store=registry.store.uri, max_queue=8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        bodies = list(pool.map(lambda _: generate(server, steps=1, adapters=[{"id": "style"}]), range(4)))
    assert {b["adapters"][0]["version"] for b in bodies} == {1}
    samples = metric_samples(server)
    assert value(samples, "loraswap_adapter_load_seconds_count") == 1
    assert value(samples, "loraswap_adapter_cache_entries", tier="device") == 1
    assert value(samples, "loraswap_adapter_cache_misses_total", tier="device") == 1
    assert value(samples, "loraswap_stage_duration_seconds_count", stage="adapter_load") >= 1


def test_duplicate_adapter_in_one_request_is_422(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    server = start_server(store=registry.store.uri)
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, "adapters": [{"id": "style"}, {"id": "style"}]})
    assert response.status_code == 422


def test_pinned_adapters_are_loaded_at_start(
    start_server: Any, registry: Registry, lora_files: dict[str, bytes]
) -> None:
    registry.register(lora_files["style"], "style")
    server = start_server(store=registry.store.uri, pinned_adapters=["style"])
    samples = metric_samples(server)
    assert value(samples, "loraswap_adapter_cache_entries", tier="device") == 1
    body = generate(server, adapters=[{"id": "style"}])
    assert "adapter_load_s" in body["timings"]
    assert value(metric_samples(server), "loraswap_adapter_load_seconds_count") == 1


def test_torch_state_is_untouched(base_model: Any) -> None:
    """Hooks leave the module tree and weights as they were (no wrapped modules, no merged deltas)."""
    names = {n for n, _ in base_model.pipe.unet.named_modules()}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert not any(n.endswith(".base_layer") for n in names)
    assert torch.isfinite(next(base_model.pipe.unet.parameters())).all()
