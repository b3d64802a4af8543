"""``GET /ui``: the web console — static HTML, CSS and JavaScript shipped in the package (``service/static``).

No build step and no CDN: four small files, read once. The page itself holds no data and needs no token;
everything it shows comes from the API with the bearer token the user typed (kept in the tab's
``sessionStorage``, sent as ``Authorization``, never in a URL), so every action needs the scope the API
demands for it. The Content-Security-Policy allows scripts and styles from this origin only (no
``unsafe-inline``, no ``unsafe-eval``); images also from ``blob:`` and ``data:`` (pictures fetched with the
token, generated PNGs).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import Controller, Response, get
from litestar.exceptions import NotFoundException

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "adapters.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    return (resources.files("service") / "static" / name).read_bytes()


def serve(name: str) -> Response[bytes]:
    if name not in FILES:
        raise NotFoundException(f"no console file {name!r}")
    return Response(asset(name), media_type=FILES[name], headers=HEADERS)


class ConsoleController(Controller):
    path = "/ui"
    tags = ["console"]
    include_in_schema = False

    @get("/", summary="The web console.")
    async def index(self) -> Response[bytes]:
        return serve("index.html")

    @get("/{name:str}", summary="A file of the web console.")
    async def file(self, name: str) -> Response[bytes]:
        return serve(name)
