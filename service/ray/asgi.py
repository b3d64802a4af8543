"""One HTTP exchange carried between Ray Serve deployments, and run through an ASGI app.

The ingress reads a request (bounded), sends it to a replica as a ``Forwarded`` value, and the replica
runs it through the very Litestar app ``loraswap serve`` runs (``call_app``): routes, auth, limits,
error bodies and metrics are that app's. Nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from litestar.types import ASGIApp, Message

Headers = list[tuple[bytes, bytes]]


@dataclass
class Forwarded:
    """An HTTP request as the ingress received it (the body read up to a limit)."""

    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"


@dataclass
class Reply:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None


def http_scope(request: Forwarded) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def call_app(app: ASGIApp, request: Forwarded) -> Reply:
    """Run ``request`` through ``app``; the reply it sent.

    The body is delivered at once; after that ``receive`` waits until this call is cancelled (the
    client went away: Ray cancels the replica's call when the ingress's is), and then reports
    ``http.disconnect``, so the app abandons the job as it does for a real client. The app runs in a
    task of its own so that it gets to answer (499) before the cancellation goes on.
    """
    gone = asyncio.Event()
    delivered = False
    reply = Reply(status=500)
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            message: Any = {"type": "http.request", "body": request.body, "more_body": False}
            return message
        await gone.wait()
        disconnect: Any = {"type": "http.disconnect"}
        return disconnect

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            reply.status = int(message["status"])
            reply.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    task = asyncio.ensure_future(app(http_scope(request), receive, send))  # type: ignore[arg-type]
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        gone.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        raise
    reply.body = b"".join(chunks)
    return reply


async def read_bounded(receive: Any, limit: int) -> tuple[bytes, bool]:
    """An ASGI request body, read up to ``limit`` + 1 bytes; ``(body, complete)``. The app behind sees
    at most one byte over its limit, which is enough for it to answer 413 itself."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), False
        body = message.get("body", b"")
        room = limit + 1 - size
        chunks.append(body[:room])
        size += min(len(body), room)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


async def send_reply(send: Any, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})
