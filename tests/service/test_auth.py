"""Bearer tokens in two scopes, and the refusal to bind openly without them."""

from __future__ import annotations

from typing import Any

import pytest

from basemodel.errors import ConfigError
from basemodel.settings import load_settings

GEN = "g" * 24
ADMIN = "a" * 24


def test_tokens_required_when_configured(start_server: Any) -> None:
    server = start_server(generate_tokens=[GEN], admin_tokens=[ADMIN])
    body = {"prompt": "a", "steps": 1}
    with server.client() as http:
        missing = http.post("/v1/generate", json=body)
        wrong = http.post("/v1/generate", json=body, headers={"Authorization": "Bearer " + "x" * 24})
        ok = http.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {GEN}"})
        admin_ok = http.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        health = http.get("/healthz")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    assert wrong.status_code == 401
    assert ok.status_code == 200
    assert admin_ok.status_code == 200
    assert health.status_code == 200


def test_open_bind_without_tokens_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORASWAP_GENERATE_TOKENS", raising=False)
    with pytest.raises(ConfigError, match="allow-unauthenticated"):
        load_settings(host="0.0.0.0")
    assert load_settings(host="0.0.0.0", allow_unauthenticated=True).host == "0.0.0.0"
    monkeypatch.setenv("LORASWAP_GENERATE_TOKENS", GEN + "," + GEN.upper())
    settings = load_settings(host="0.0.0.0")
    assert settings.generate_tokens == [GEN, GEN.upper()]


def test_short_tokens_are_refused() -> None:
    with pytest.raises(ConfigError, match="16 characters"):
        load_settings(generate_tokens=["short"])
