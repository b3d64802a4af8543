"""Bearer-token guards with two scopes: ``generate`` and ``admin`` (admin implies generate).

Tokens are compared in constant time (``hmac.compare_digest``) against every configured token. With
no tokens configured, auth is off (the settings refuse a non-loopback bind in that case unless
``allow_unauthenticated`` is set).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from basemodel.errors import Forbidden, Unauthorized
from basemodel.settings import Settings

Scope = Literal["generate", "admin"]


def _matches(token: str, candidates: list[str]) -> bool:
    found = False
    for candidate in candidates:  # no early exit: timing does not reveal which token matched
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def scopes_for(token: str, settings: Settings) -> set[Scope]:
    if _matches(token, settings.admin_tokens):
        return {"admin", "generate"}
    if _matches(token, settings.generate_tokens):
        return {"generate"}
    return set()


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require(scope: Scope) -> Any:
    """A Litestar guard demanding ``scope``."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        settings: Settings = connection.app.state.settings
        if not settings.auth_enabled:
            return
        token = bearer_token(connection)
        if token is None:
            raise Unauthorized("missing bearer token")
        scopes = scopes_for(token, settings)
        if not scopes:
            raise Unauthorized("invalid bearer token")
        if scope not in scopes:
            raise Forbidden(f"this route needs the '{scope}' scope")

    return guard


def owner_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who owns what this request makes (jobs): a digest of its bearer token, never the token itself.
    With auth off every request has the same key ``""``: jobs are then shared by everyone who can reach
    the server, protected only by their unguessable ids."""
    settings: Settings = connection.app.state.settings
    token = bearer_token(connection) if settings.auth_enabled else None
    return hashlib.sha256(token.encode()).hexdigest() if token else ""
