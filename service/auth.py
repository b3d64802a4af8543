"""Bearer-token guards with two scopes: ``generate`` and ``admin`` (admin implies generate).

Routes for clients that only speak HTTP basic auth (the A1111-compatible ``/sdapi/v1/*``: ``webuiapi``'s
``set_auth(user, password)``) also take ``Authorization: Basic`` with the token as the password (any
user name). Tokens are compared in constant time (``hmac.compare_digest``) against every configured
token. With no tokens configured, auth is off (the settings refuse a non-loopback bind in that case
unless ``allow_unauthenticated`` is set).
"""

from __future__ import annotations

import base64
import binascii
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


def basic_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The password of ``Authorization: Basic base64(user:password)`` (the user name when the password
    is empty); ``None`` when there is no such header or it does not decode."""
    header = connection.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    token = password or user
    return token if token.strip() else None


def require(scope: Scope, *, basic: bool = False) -> Any:
    """A Litestar guard demanding ``scope``; ``basic``: HTTP basic auth with the token as password too."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        settings: Settings = connection.app.state.settings
        if not settings.auth_enabled:
            return
        token = bearer_token(connection) or (basic_token(connection) if basic else None)
        if token is None:
            raise Unauthorized(
                "missing bearer token (or HTTP basic auth with the token as password)"
                if basic
                else "missing bearer token"
            )
        scopes = scopes_for(token, settings)
        if not scopes:
            raise Unauthorized("invalid bearer token")
        if scope not in scopes:
            raise Forbidden(f"this route needs the '{scope}' scope")

    return guard


def request_scopes(connection: ASGIConnection[Any, Any, Any, Any]) -> set[Scope]:
    """The scopes of the request's bearer token (every scope when auth is off)."""
    settings: Settings = connection.app.state.settings
    if not settings.auth_enabled:
        return {"admin", "generate"}
    token = bearer_token(connection)
    return scopes_for(token, settings) if token else set()


def owner_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who owns what this request makes (jobs): a digest of its bearer token, never the token itself.
    With auth off every request has the same key ``""``: jobs are then shared by everyone who can reach
    the server, protected only by their unguessable ids."""
    settings: Settings = connection.app.state.settings
    token = bearer_token(connection) if settings.auth_enabled else None
    return hashlib.sha256(token.encode()).hexdigest() if token else ""
