"""The audit log: every mutating API call (POST, PUT, PATCH, DELETE), whoever made it and
over whichever listener, as one JSON line in `<home>/audit.log`.

A line holds `time` (ISO 8601, UTC), `who`, `method`, `path` (and `query`), `body` (a
summary: secrets redacted, at most BODY_CAP characters), `status`, `error` (for failures)
and `duration_ms`. `who` is what the listener knows of the caller:

* Unix socket: `{"via": "unix", "uid", "gid", "pid", "user"}` from SO_PEERCRED;
* mutual TLS: `{"via": "tls", "address", "cn"}` from the client certificate;
* the web console (any listener): `token` and `role` of the request's token.

The peer is read once per connection by `PeerProtocol` (uvicorn's h11 protocol, which puts
it in the ASGI scope's `state`). Lines are written by a logging thread (`QueueListener`), so
the event loop only formats and enqueues; the file is 0600 and rotated at ROTATE_BYTES,
KEEP files kept. Requests the daemon makes to itself (tasks, the console's data) are not
logged: the request that started them is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import pwd
import queue
import re
import socket
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from uvicorn.protocols.http.h11_impl import H11Protocol

from gridvm.api.limits import Asgi, Message, Receive, Scope, Send

AUDIT_FILE = "audit.log"
ROTATE_BYTES = 10 << 20
KEEP = 5
BODY_CAP = 2048          # characters of the body summary
READ_CAP = 64 << 10      # bytes of a request body looked at
ERROR_CAP = 4096         # bytes of an error answer looked at
MAX_LIMIT = 10_000
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PEER_KEY = "gridvm.peer"
REDACTED = "***"
_SECRET_KEY = re.compile(r"pass|secret|token|cookie|auth|(^|_)key$|^key_|private", re.I)
_SECRET_IN_TEXT = re.compile(
    r"(?i)(\b\w*(?:passw(?:or)?d|secret|token)\w*\b\s*[=:]\s*)(['\"]?)([^'\",\s]+)")
_TOKEN_TEXT = re.compile(r"gvt_[0-9a-f]{8}_[A-Za-z0-9_-]+")

log = logging.getLogger("gridvm.api.audit")


# ----- who is calling --------------------------------------------------------------------


def peer_of(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """The caller of a connection: SO_PEERCRED on a Unix socket, the client certificate's
    CN on TLS, else its address."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return {"via": "unix"}
        pid, uid, gid = struct.unpack("3i", raw)
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return {"via": "unix", "uid": uid, "gid": gid, "pid": pid, "user": user}
    who: dict[str, Any] = {"via": "tcp"}
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        who["address"] = str(peer[0])
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        who["via"] = "tls"
        cert = ssl_object.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    who["cn"] = value
    return who


class PeerProtocol(H11Protocol):
    """uvicorn's HTTP protocol, adding the connection's caller to each request's scope
    (`scope["state"]["gridvm.peer"]`); pass as `uvicorn.Config(http=PeerProtocol)`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # app_state is copied into every request's scope; this copy is this connection's.
        self.app_state = {**self.app_state, PEER_KEY: peer_of(transport)}


# ----- what was asked --------------------------------------------------------------------


def redact(value: Any) -> Any:
    """`value` with secrets replaced: values of secret-named keys, and `password=…`-like
    settings or gridvm tokens inside strings (an xm config's `vncpasswd = '…'`)."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        text = _SECRET_IN_TEXT.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", value)
        return _TOKEN_TEXT.sub(REDACTED, text)
    return value


def summarize(body: bytes, truncated: bool) -> Any:
    """A request body as logged: its JSON, redacted and capped; or its size."""
    if not body:
        return None
    try:
        if truncated:
            raise ValueError("cut")
        data = redact(json.loads(body))
    except ValueError:
        return {"bytes": len(body) if not truncated else f">{len(body)}"}
    text = json.dumps(data, separators=(",", ":"))
    return data if len(text) <= BODY_CAP else text[:BODY_CAP] + "…"


def _error_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(data, dict):          # gridvmd's {"error"} or FastAPI's {"detail"}
        data = data.get("error", data.get("detail", data))
    return str(data)[:500]


# ----- the log file ----------------------------------------------------------------------


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are created 0600."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return open(fd, self.mode, encoding=self.encoding)  # noqa: SIM115 - the handler's


class AuditLog:
    """The home's audit log: `record` enqueues a line, a thread writes it."""

    def __init__(self, root: Path, *, rotate_bytes: int = ROTATE_BYTES, keep: int = KEEP,
                 tokens: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.path = root / AUDIT_FILE
        self.tokens = tokens          # token text -> {"token", "role"} (the web console's)
        self._handler = _PrivateRotatingHandler(self.path, maxBytes=rotate_bytes,
                                                backupCount=keep, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, self._handler)
        self._listener.start()
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._listener.stop()
            self._handler.close()

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), default=str)
        rec = logging.LogRecord("gridvm.audit", logging.INFO, __file__, 0, line, None, None)
        if self._open:
            self._queue.put(rec)
        else:                          # after close (the last requests of a shutdown)
            with contextlib.suppress(OSError):
                self._handler.handle(rec)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was recorded is written (tests, and before reading)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        self._handler.flush()

    def tail(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` entries, oldest first (reading rotated files if needed)."""
        self.flush()
        lines: list[str] = []
        for n in range(KEEP + 1):
            path = self.path if n == 0 else self.path.with_name(f"{AUDIT_FILE}.{n}")
            try:
                with path.open("rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - (limit + 1) * 4096))
                    chunk = f.read().decode("utf-8", errors="replace").splitlines()
            except OSError:
                break
            if size > (limit + 1) * 4096:
                chunk = chunk[1:]          # the first line read may be cut
            lines = chunk + lines
            if len(lines) >= limit:
                break
        out: list[dict[str, Any]] = []
        for line in lines[-limit:]:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


# ----- the middleware --------------------------------------------------------------------


def _who(scope: Scope, audit: AuditLog) -> dict[str, Any]:
    state = scope.get("state") or {}
    who = dict(state.get(PEER_KEY) or {"via": "unknown"})
    headers = dict(scope.get("headers") or [])
    text = ""
    auth = headers.get(b"authorization", b"").decode(errors="replace")
    if auth.lower().startswith("bearer "):
        text = auth[7:].strip()
    else:
        for part in headers.get(b"cookie", b"").decode(errors="replace").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "gridvm_token":
                text = value
    if text and audit.tokens is not None:
        who.update(audit.tokens(text))
    return who


class Audited:
    """ASGI wrapper for one listener: mutating HTTP requests are recorded in `audit`."""

    def __init__(self, app: Asgi, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in MUTATING:
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        body = bytearray()
        truncated = False
        status = 0
        answer = bytearray()

        async def seen_receive() -> Message:
            nonlocal truncated
            msg = await receive()
            if msg["type"] == "http.request":
                chunk = msg.get("body", b"")
                room = READ_CAP - len(body)
                body.extend(chunk[:max(room, 0)])
                truncated = truncated or len(chunk) > room
            return msg

        async def seen_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            elif msg["type"] == "http.response.body" and status >= 400 \
                    and len(answer) < ERROR_CAP:
                answer.extend(msg.get("body", b"")[:ERROR_CAP - len(answer)])
            await send(msg)

        try:
            await self.app(scope, seen_receive, seen_send)
        finally:
            entry: dict[str, Any] = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "who": _who(scope, self.audit),
                "method": scope["method"],
                "path": scope.get("path", ""),
            }
            query = scope.get("query_string", b"")
            if query:
                entry["query"] = redact(query.decode(errors="replace"))
            entry["body"] = summarize(bytes(body), truncated)
            entry["status"] = status or 500
            if status >= 400 or not status:
                entry["error"] = _error_of(bytes(answer)) if answer else "no answer"
            entry["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
            self.audit.record(entry)


def audit_routes(audit: AuditLog) -> APIRouter:
    """`GET /v1/audit?limit=N`: the last N entries, oldest first."""
    r = APIRouter()

    @r.get("/v1/audit")
    async def entries(limit: int = Query(default=50, ge=1, le=MAX_LIMIT)) -> list[dict[str, Any]]:
        return await asyncio.to_thread(audit.tail, limit)

    return r
