"""Who is asking: every web request carries a token (the login cookie, or a Bearer header
for scripts) that is checked against the home's token store on every request, so a revoked
or expired token stops working at once.

* no token, a malformed, unknown, revoked or expired one: 401;
* a readonly token on anything that changes something (every POST, the serial console): 403;
* a request from another origin (the Origin header names another site): 403 — this, with the
  cookie's SameSite=Strict, keeps other sites from acting with a logged-in browser.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.requests import HTTPConnection

from gridvm.api.tokens import Token, TokenStore, Unauthorized

COOKIE = "gridvm_token"
PATH = "/ui"


def token_text(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return conn.cookies.get(COOKIE)


def same_origin(conn: HTTPConnection, *, required: bool) -> bool:
    """Does the Origin header (if any; `required`: it must be there) name this server?"""
    origin = conn.headers.get("origin")
    if origin is None:
        return not required
    parts = urlsplit(origin)
    scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
    return parts.scheme == scheme and parts.netloc == conn.headers.get("host", "")


class Gate:
    """Checks tokens and origins for the web routes."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    def who(self, conn: HTTPConnection) -> Token:
        """The caller's token, or 401."""
        text = token_text(conn)
        if not text:
            raise HTTPException(401, "log in with a token (gridvm web token create)")
        try:
            return self.tokens.verify(text)
        except Unauthorized as exc:
            raise HTTPException(401, str(exc)) from None

    def reader(self, request: Request) -> Token:
        """Any valid token may read."""
        return self.who(request)

    def writer(self, request: Request) -> Token:
        """Only an admin token may change something, and only from this origin."""
        if not same_origin(request, required=False):
            raise HTTPException(403, "request from another origin refused")
        token = self.who(request)
        if token.role != "admin":
            raise HTTPException(403, f"token {token.id} is read-only")
        return token

    def admin(self, request: Request) -> Token:
        """An admin token (reading what only admins may read, such as the audit log)."""
        token = self.who(request)
        if token.role != "admin":
            raise HTTPException(403, f"token {token.id} is read-only: admins only")
        return token

    def console(self, conn: HTTPConnection) -> Token:
        """A console websocket: this origin (required), an admin token."""
        if not same_origin(conn, required=True):
            raise HTTPException(403, "websocket from another origin refused")
        token = self.who(conn)
        if token.role != "admin":
            raise HTTPException(403, f"token {token.id} is read-only: no console input")
        return token


def user_of(token: Token) -> str:
    """How a task names who started it."""
    return f"token {token.id} ({token.role})" + (f" {token.comment}" if token.comment else "")


def cookie_args(conn: HTTPConnection, token: Token) -> dict[str, Any]:
    """Set-Cookie attributes for a login with `token`."""
    return {"key": COOKIE, "httponly": True, "samesite": "strict", "path": PATH,
            "secure": conn.url.scheme == "https",
            "max_age": max(int(token.expires - time.time()), 1) if token.expires else None}
