"""The LoRA paths through the real server: the response names the path, /metrics counts it, and a
request abandoned mid-batch leaves the base weights as a fresh server has them."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.conftest import metric_value, scrape, value, wait_until

SMALL = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 11}


@pytest.fixture
def registry(base_model: Any, tmp_path: Path) -> Registry:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base_model))
    registry.register(save_bytes(diffusers_layout(make_case(base_model.pipe))), "style")
    return registry


def generate(server: Any, **body: Any) -> dict[str, Any]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**SMALL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_response_names_the_path_and_metrics_count_it(start_server: Any, registry: Registry) -> None:
    server = start_server(store=registry.store.uri)
    assert generate(server)["lora_path"] == "none"
    fused = generate(server, adapters=[{"id": "style", "scale": 0.5}])
    assert fused["lora_path"] == "fused" and fused["timings"]["lora_fuse_s"] > 0
    again = generate(server, adapters=[{"id": "style", "scale": 0.5}])
    assert again["lora_path"] == "fused" and "lora_fuse_s" not in again["timings"], "sticky: no second fuse"
    with server.client() as http:
        response = http.post("/v1/generate", json=SMALL, headers={"Accept": "image/png"})
    assert response.headers["X-Loraswap-Lora-Path"] == "none"
    assert "lora_restore_s" in response.headers["X-Loraswap-Timings"]
    samples = scrape(server.url)
    assert value(samples, "loraswap_lora_path_total", path="none") == 2
    assert value(samples, "loraswap_lora_path_total", path="fused") == 2
    assert value(samples, "loraswap_lora_path_total", path="hooked") == 0
    assert value(samples, "loraswap_lora_fuse_seconds_count") == 1
    assert value(samples, "loraswap_lora_restore_seconds_count") == 1
    assert value(samples, "loraswap_lora_fused_modules") == 0
    assert (
        0 < value(samples, "loraswap_lora_fused_bytes") <= value(samples, "loraswap_lora_fuse_budget_bytes")
    )
    assert value(samples, "loraswap_lora_fuse_budget_bytes") == 256 << 20
    server.stop()

    hooked = start_server(store=registry.store.uri, lora_path="hooked")
    body = generate(hooked, adapters=[{"id": "style", "scale": 0.5}])
    assert body["lora_path"] == "hooked"
    assert metric_value(hooked.url, "loraswap_lora_fuse_seconds_count") == 0


def test_a_request_abandoned_mid_batch_leaves_no_fused_weights(start_server: Any, registry: Registry) -> None:
    fresh = start_server(store=registry.store.uri)
    baseline = generate(fresh)["images"][0]["png_base64"]
    fresh.stop()
    server = start_server(store=registry.store.uri, lora_path="fused")
    generate(server, steps=1, adapters=[{"id": "style"}])  # resident, and the fuse measured once
    generate(server)  # restored again
    body = json.dumps({**SMALL, "steps": 150, "adapters": [{"id": "style"}]}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: metric_value(server.url, "loraswap_lora_fused_modules") > 0, "the batch to fuse")
    # the client is gone: the job stops at its next step and restores at once, before any other request
    wait_until(lambda: metric_value(server.url, "loraswap_lora_fused_modules") == 0, "the restore")
    assert metric_value(server.url, "loraswap_images_generated_total") == 2
    assert generate(server)["images"][0]["png_base64"] == baseline
