"""A small synchronous client for the loraswap HTTP API (used by ``loraswap generate``).

With a progress callback, ``generate`` submits a job (``POST /v1/jobs``), follows its Server-Sent Events
and fetches the result; a server without ``/v1/jobs`` (404 ``not_found`` / 405) is asked with
``POST /v1/generate`` instead, as without a callback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from basemodel.errors import LoraswapError, ValidationFailed

ADAPTER_REF = re.compile(
    r"^(?P<id>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>\d+|latest))?(?::(?P<scale>-?[\d.]+))?$"
)


JOBS_PATH = "/v1/jobs"
ENDED = ("succeeded", "failed", "cancelled")
Progress = Callable[[int, int], None]
"""``progress(step, steps)``: called as the server reports denoising steps."""


class RemoteError(LoraswapError):
    """An error response from the server, carrying its type and status."""

    def __init__(self, status: int, body: dict[str, Any], what: str | None = None) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(
            f"{what or f'server answered {status}'}: {error.get('message', body)}",
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

    def generate(self, body: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """The ``/v1/generate`` response body; with ``progress``, made as a job whose steps it reports
        (when the server offers jobs)."""
        if progress is not None:
            result = self._generate_as_job(body, progress)
            if result is not None:
                return result
        return _json(self._expect(self._call("POST", "/v1/generate", json=body), 200))

    def _generate_as_job(self, body: dict[str, Any], progress: Progress) -> dict[str, Any] | None:
        response = self._call("POST", JOBS_PATH, json=body)
        if response.status_code in (404, 405) and _error_type(response) in (
            "not_found",
            "method_not_allowed",
        ):
            return None  # a server without jobs
        job = _json(self._expect(response, 202))
        url = response.headers.get("location") or f"{JOBS_PATH}/{job['id']}"
        try:
            job = self._follow(url, progress)
        except KeyboardInterrupt:
            self._call("DELETE", url)  # do not leave the server working for nobody
            raise
        if job["state"] == "failed":
            raise RemoteError(200, {"error": job.get("error") or {}}, what=f"job {job['id']} failed")
        if job["state"] == "cancelled":
            raise LoraswapError(f"job {job['id']} was cancelled", detail={"job_id": job["id"]})
        result: dict[str, Any] = job["result"]
        return result

    def _follow(self, url: str, progress: Progress) -> dict[str, Any]:
        """Report the job's steps from its event stream (polling if the stream breaks); its final state."""
        try:
            with self._http.stream("GET", f"{url}/events", headers={"Accept": "text/event-stream"}) as stream:
                if stream.status_code == 200:
                    for event, data in sse_events(stream.iter_lines()):
                        if "step" in data and "steps" in data:
                            progress(int(data["step"]), int(data["steps"]))
                        if event in ("done", "failed", "cancelled"):
                            break
        except httpx.HTTPError:
            pass  # poll instead
        while True:
            job = _json(self._expect(self._call("GET", url), 200))
            if job["state"] in ENDED:
                return job
            progress(int(job["step"]), int(job["steps"]))
            time.sleep(0.5)

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise LoraswapError(
                f"cannot reach the server: {exc}", hint="Is `loraswap serve` running?"
            ) from exc

    @staticmethod
    def _expect(response: httpx.Response, status: int) -> httpx.Response:
        if response.status_code != status:
            try:
                payload = response.json()
            except ValueError:
                payload = {"error": {"message": response.text}}
            raise RemoteError(response.status_code, payload)
        return response

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


def _json(response: httpx.Response) -> dict[str, Any]:
    data: dict[str, Any] = response.json()
    return data


def _error_type(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return None
    return error.get("type") if isinstance(error, dict) else None


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs of a Server-Sent Events stream whose data is JSON (comments skipped)."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
