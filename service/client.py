"""A small synchronous client for the loraswap HTTP API (used by ``loraswap generate``)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import httpx

from basemodel.errors import LoraswapError, ValidationFailed

ADAPTER_REF = re.compile(
    r"^(?P<id>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>\d+|latest))?(?::(?P<scale>-?[\d.]+))?$"
)


class RemoteError(LoraswapError):
    """An error response from the server, carrying its type and status."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(
            f"server answered {status}: {error.get('message', body)}",
            detail=error.get("detail"),
            hint=error.get("hint"),
        )
        self.type = str(error.get("type", "http_error"))
        self.status = status


def parse_adapter_ref(ref: str) -> dict[str, Any]:
    """``id``, ``id@3``, ``id@latest``, ``id:0.8``, ``id@3:0.8`` → an adapters[] entry."""
    match = ADAPTER_REF.match(ref)
    if not match:
        raise ValidationFailed(
            f"bad adapter reference {ref!r}", hint="Use ID, ID@VERSION, ID:SCALE or ID@V:SCALE."
        )
    spec: dict[str, Any] = {"id": match["id"]}
    if match["version"] and match["version"] != "latest":
        spec["version"] = int(match["version"])
    if match["scale"] is not None:
        spec["scale"] = float(match["scale"])
    return spec


class GenerateClient:
    def __init__(self, server: str, token: str | None = None, timeout: float = 600.0) -> None:
        token = token or os.environ.get("LORASWAP_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post("/v1/generate", json=body)
        except httpx.HTTPError as exc:
            raise LoraswapError(
                f"cannot reach the server: {exc}", hint="Is `loraswap serve` running?"
            ) from exc
        if response.status_code != 200:
            try:
                payload = response.json()
            except ValueError:
                payload = {"error": {"message": response.text}}
            raise RemoteError(response.status_code, payload)
        data: dict[str, Any] = response.json()
        return data

    @staticmethod
    def save_images(result: dict[str, Any], output: Path) -> list[Path]:
        images = result["images"]
        if len(images) == 1:
            paths = [output]
        else:
            paths = [
                output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(len(images))
            ]
        for path, image in zip(paths, images, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(image["png_base64"]))
        return paths
