"""Access tokens for the web console: roles admin and readonly, stored hashed in the home.

A token is `gvt_<id>_<secret>`; the home's `tokens.db` keeps the id, role, expiry and the
SHA-256 of the secret (a random 32-byte secret needs no slow hash), never the secret. The
secret is shown once, when `gridvm web token create` makes it. `/v1/tokens` (Unix socket
only: whoever may use the socket may make tokens) creates, lists and revokes them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gridvm.errors import ConfigError, GridvmError, NotFound
from gridvm.paths import Home

Role = Literal["admin", "readonly"]
ROLES: tuple[Role, ...] = ("admin", "readonly")
PREFIX = "gvt_"
TOKEN_RE = re.compile(r"^gvt_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
TTL_RE = re.compile(r"^(\d+)([smhdw]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DEFAULT_TTL = "30d"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    digest TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL
);
"""


class Unauthorized(GridvmError):
    """No token, an unknown or revoked one, or an expired one (HTTP 401)."""


def parse_ttl(text: str) -> float | None:
    """`90s`, `30m`, `8h`, `30d`, `2w` (or plain seconds) → seconds; `0` → never expires."""
    m = TTL_RE.match(text.strip())
    if not m:
        raise ConfigError(f"invalid ttl {text!r}: use a number with s, m, h, d or w (0: never)")
    seconds = int(m[1]) * UNITS[m[2]]
    return None if seconds == 0 else float(seconds)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    """A token as stored (without its secret)."""

    id: str
    role: Role
    comment: str
    created: float
    expires: float | None

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now or time.time()) >= self.expires

    def view(self) -> dict[str, Any]:
        return {**asdict(self), "expired": self.expired()}


class TokenStore:
    """The home's tokens (SQLite, safe to use from the daemon and the CLI at once)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        path.chmod(0o600)

    @classmethod
    def of(cls, home: Home) -> TokenStore:
        return cls(home.root / "tokens.db")

    def close(self) -> None:
        self._db.close()

    def create(self, role: str, ttl: float | None, comment: str = "") -> tuple[Token, str]:
        """A new token and its full secret string (shown once)."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r} (use admin or readonly)")
        tid, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        now = time.time()
        token = Token(tid, role, comment, now, now + ttl if ttl else None)
        with self._lock:
            self._db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                             (tid, role, _digest(secret), comment, now, token.expires))
        return token, f"{PREFIX}{tid}_{secret}"

    def verify(self, text: str) -> Token:
        """The token `text` stands for; Unauthorized if malformed, unknown or expired."""
        m = TOKEN_RE.match(text.strip())
        if not m:
            raise Unauthorized("not a gridvm token (they look like gvt_…)")
        with self._lock:
            row = self._db.execute("SELECT id, role, comment, created, expires, digest "
                                   "FROM tokens WHERE id = ?", (m[1],)).fetchone()
        if row is None or not hmac.compare_digest(str(row[5]), _digest(m[2])):
            raise Unauthorized("unknown or revoked token")
        token = Token(*row[:5])
        if token.expired():
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(token.expires))
            raise Unauthorized(f"token {token.id} expired at {when}")
        return token

    def describe(self, text: str) -> dict[str, Any]:
        """Who a token names, for the audit log: id, role and comment, or why it is not valid."""
        try:
            token = self.verify(text)
        except Unauthorized as exc:
            m = TOKEN_RE.match(text.strip())
            return {"token": m[1] if m else "malformed", "token_error": str(exc)}
        return {"token": token.id, "role": token.role,
                **({"token_comment": token.comment} if token.comment else {})}

    def all(self) -> list[Token]:
        with self._lock:
            rows = self._db.execute("SELECT id, role, comment, created, expires FROM tokens "
                                    "ORDER BY created").fetchall()
        return [Token(*r) for r in rows]

    def revoke(self, tid: str) -> None:
        with self._lock:
            gone = self._db.execute("DELETE FROM tokens WHERE id = ?", (tid,)).rowcount
        if not gone:
            raise NotFound(f"no token {tid!r}")


class TokenRequest(BaseModel):
    role: Role
    ttl: str = DEFAULT_TTL
    comment: str = Field(default="", max_length=200)


def token_routes(store: TokenStore) -> APIRouter:
    """`/v1/tokens`: create (the secret is in the answer, once), list, revoke."""
    r = APIRouter(prefix="/v1/tokens")

    @r.post("")
    async def create(req: TokenRequest) -> dict[str, Any]:
        token, secret = store.create(req.role, parse_ttl(req.ttl), req.comment)
        return {**token.view(), "token": secret}

    @r.get("")
    async def list_tokens() -> list[dict[str, Any]]:
        return [t.view() for t in store.all()]

    @r.delete("/{tid}")
    async def revoke(tid: str) -> dict[str, Any]:
        store.revoke(tid)
        return {"revoked": tid}

    return r
