"""A trained adapter, registered by `loraswap train --register`, is served by a running server at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.service.conftest import start_server  # noqa: F401  (fixture)
from tests.training.conftest import TRIGGER


def test_running_server_serves_the_trained_adapter(trained: Any, start_server: Any) -> None:
    store = Path(trained.report["hyperparameters"]["store"])
    server = start_server(store=str(store))
    request = {
        "prompt": f"{TRIGGER}, a small red square on a pink background, sunset style",
        "steps": 4,
        "width": 32,
        "height": 32,
        "seed": 0,
    }
    with server.client() as http:
        plain = http.post("/v1/generate", json=request)
        adapted = http.post("/v1/generate", json={**request, "adapters": [{"id": "sunset-style"}]})
        tagged = http.post(
            "/v1/generate", json={**request, "prompt": request["prompt"] + f" <lora:{trained.ref}:1>"}
        )
    assert plain.status_code == 200 and adapted.status_code == 200 and tagged.status_code == 200
    assert adapted.json()["adapters"][0]["version"] == 1
    assert adapted.json()["images"][0]["png_base64"] != plain.json()["images"][0]["png_base64"]
    assert tagged.json()["adapters"][0]["id"] == "sunset-style"
