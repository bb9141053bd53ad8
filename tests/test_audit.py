"""The audit log of mutating calls: redaction, the 0600 rotated file, SO_PEERCRED through a
real uvicorn on a Unix socket, and (guest) a gridvmd whose create, destroy and rejected
calls appear with uid, path and status, readable with `gridvm audit`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException
from hostlab import HostEnv
from pydantic import BaseModel

from gridvm.api.audit import REDACTED, Audited, AuditLog, PeerProtocol, redact, summarize

TOKEN = "gvt_0123abcd_" + "s" * 43


def test_secrets_are_redacted_wherever_they_are() -> None:
    body = {"token": TOKEN, "config": {"name": "web", "display": {"vncpasswd": "hunter2"}},
            "ca_key": "-----BEGIN", "password": "", "key": "k", "keys": ["a"],
            "params": {"config": "name = 'x'\nvncpasswd = 'hunter2'\nvfb = ['vnc=1,vncpasswd=pw']",
                       "note": f"Bearer {TOKEN}"}}
    out = redact(body)
    text = json.dumps(out)
    assert "hunter2" not in text and "pw'" not in text and TOKEN not in text
    assert "-----BEGIN" not in text and out["key"] == REDACTED
    assert out["config"]["name"] == "web" and out["keys"] == ["a"]
    assert out["password"] == ""        # nothing to hide
    assert "vncpasswd = '***'" in out["params"]["config"]


def test_body_summary_is_capped_and_binary_is_sized() -> None:
    big = json.dumps({"extra": "x" * 10_000}).encode()
    summary = summarize(big, truncated=False)
    assert isinstance(summary, str) and len(summary) <= 2100 and summary.endswith("…")
    assert summarize(b"\x00\xff", truncated=False) == {"bytes": 2}
    assert summarize(b"{}", truncated=True) == {"bytes": ">2"}
    assert summarize(b"", truncated=False) is None


def test_the_file_is_0600_rotated_and_read_back_across_rotations(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, rotate_bytes=4000, keep=5)
    try:
        for i in range(100):
            audit.record({"n": i, "pad": "p" * 100})
        entries = audit.tail(60)
    finally:
        audit.close()
    assert [e["n"] for e in entries] == list(range(40, 100))
    files = sorted(tmp_path.glob("audit.log*"))
    assert 3 <= len(files) <= 6
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert f.stat().st_size <= 4000 + 200


class Thing(BaseModel):
    name: str
    password: str = ""


def small_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/things")
    async def things() -> list[str]:
        return []

    @app.post("/v1/things")
    async def make(thing: Thing) -> dict[str, Any]:
        return {"made": thing.name}

    @app.delete("/v1/things/{name}")
    async def remove(name: str) -> dict[str, Any]:
        raise HTTPException(404, f"no thing {name!r}")

    return app


@contextlib.contextmanager
def unix_server(app: Any, path: Path) -> Iterator[None]:
    """A real uvicorn with the audit protocol on a Unix socket, in a thread."""
    config = uvicorn.Config(app, uds=str(path), lifespan="off", log_level="warning",
                            http=PeerProtocol)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


def test_mutating_calls_over_a_unix_socket_name_the_caller(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    sock = tmp_path / "api.sock"
    try:
        with unix_server(Audited(small_app(), audit), sock), httpx.Client(
                transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x") as c:
            assert c.get("/v1/things").status_code == 200
            assert c.post("/v1/things", json={"name": "a", "password": "pw1"}).status_code == 200
            assert c.post("/v1/things", json={"nom": "b"}).status_code == 422
            assert c.delete("/v1/things/zz").status_code == 404
            assert c.post("/v1/things?token=abc", content=b"\x00" * 10).status_code == 422
        entries = audit.tail(10)
    finally:
        audit.close()
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("POST", "/v1/things", 200), ("POST", "/v1/things", 422),
        ("DELETE", "/v1/things/zz", 404), ("POST", "/v1/things", 422)]
    me = {"via": "unix", "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
          "user": pwd.getpwuid(os.getuid()).pw_name}
    assert all(e["who"] == me for e in entries)
    ok, bad, missing, binary = entries
    assert ok["body"] == {"name": "a", "password": REDACTED} and "error" not in ok
    assert "invalid" in bad["error"] or "Field required" in bad["error"]
    assert missing["error"] == "no thing 'zz'"
    assert binary["body"] == {"bytes": 10} and binary["query"] == f"token={REDACTED}"
    assert all(e["time"].endswith("+00:00") and e["duration_ms"] >= 0 for e in entries)
    assert stat.S_IMODE((tmp_path / "audit.log").stat().st_mode) == 0o600


def test_mutual_tls_callers_are_named_by_their_certificate(tmp_path: Path) -> None:
    from gridvm.cluster.pki import Ca, Identity

    ca = Ca.create("audit")
    server, client = Identity(tmp_path / "server"), Identity(tmp_path / "client")
    for ident, name in ((server, "host-a"), (client, "admin-bob")):
        ident.dir.mkdir()
        ident.save(*ca.issue(name, ["127.0.0.1"]), ca.cert)
    audit = AuditLog(tmp_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(Audited(small_app(), audit), lifespan="off", log_level="warning",
                            http=PeerProtocol)
    config.load()
    config.ssl = server.server_context()
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(verify=client.client_context(),
                          base_url=f"https://127.0.0.1:{port}") as c:
            assert c.post("/v1/things", json={"name": "t"}).status_code == 200
        entry, = audit.tail(5)
    finally:
        srv.should_exit = True
        thread.join(10)
        audit.close()
    assert entry["who"] == {"via": "tls", "address": "127.0.0.1", "cn": "admin-bob"}


# ----- a real gridvmd (one tiny guest) ---------------------------------------------------------


def sock_request(host: HostEnv, method: str, path: str, body: Any = None,
                 token: str | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(host.agent.home.api_socket))
    headers = {"authorization": f"Bearer {token}"} if token else None
    with httpx.Client(transport=transport, base_url="http://x", timeout=60) as c:
        return c.request(method, path, json=body, headers=headers)


@pytest.mark.guest
def test_gridvmd_logs_create_destroy_and_rejections(host: HostEnv) -> None:
    cfg, _ = host.write_cfg("audited", extra="vnc = 1\nvncpasswd = 'hunter22'")
    host.gridvm("create", str(cfg))
    host.gridvm("list")                                                  # a read: not logged
    rejected = sock_request(host, "POST", "/v1/domains", {"config": {"name": "bad name!"}})
    assert rejected.status_code == 422
    assert sock_request(host, "POST", "/v1/domains/nosuch/destroy").status_code == 404
    login = sock_request(host, "POST", "/ui/api/login", {"token": TOKEN})
    assert login.status_code == 401
    admin = host.gridvm("web", "token", "create", "--role", "admin", "--comment",
                        "auditor").stdout.strip()
    reader = host.gridvm("web", "token", "create", "--role", "readonly").stdout.strip()
    act = {"action": "nosuch", "target": "audited"}
    assert sock_request(host, "POST", "/ui/api/tasks", act, token=TOKEN).status_code == 401
    assert sock_request(host, "POST", "/ui/api/tasks", act, token=admin).status_code >= 400
    assert sock_request(host, "GET", "/ui/api/audit", token=reader).status_code == 403
    assert sock_request(host, "GET", "/ui/api/audit", token=admin).status_code == 200
    host.gridvm("destroy", "audited")

    out = host.gridvm("audit", "--tail", "30", "--json").stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    got = [(e["method"], e["path"], e["status"]) for e in entries]
    assert ("POST", "/v1/domains", 200) in got
    assert ("POST", "/v1/domains", 422) in got
    assert ("POST", "/v1/domains/nosuch/destroy", 404) in got
    assert ("POST", "/ui/api/login", 401) in got
    assert ("POST", "/v1/tokens", 200) in got
    assert any(m == "POST" and p.endswith("/destroy") and p != "/v1/domains/nosuch/destroy"
               and s == 200 for m, p, s in got)
    assert all(e["method"] != "GET" for e in entries)
    assert all(e["who"]["uid"] == os.getuid() and e["who"]["via"] == "unix" for e in entries)
    created = next(e for e in entries if e["path"] == "/v1/domains" and e["status"] == 200)
    assert created["body"]["config"]["name"] == "audited"
    text = (host.home / "audit.log").read_text()
    assert "hunter22" not in text and TOKEN not in text
    login_entry = next(e for e in entries if e["path"] == "/ui/api/login")
    assert login_entry["body"] == {"token": REDACTED}
    forged, real = [e for e in entries if e["path"] == "/ui/api/tasks"]
    assert forged["status"] == 401 and forged["who"]["token"] == "0123abcd"
    assert "token_error" in forged["who"] and forged["who"]["uid"] == os.getuid()
    assert real["who"]["role"] == "admin" and real["who"]["token_comment"] == "auditor"
    assert real["who"]["token"] == admin.split("_")[1] and "error" in real
    assert admin not in text and reader not in text
    assert "error" in next(e for e in entries if e["status"] == 404)
    assert stat.S_IMODE((host.home / "audit.log").stat().st_mode) == 0o600
    human = host.gridvm("audit", "-n", "3").stdout.splitlines()
    assert len(human) == 3 and "/destroy" in human[-1]


def test_peer_of_reads_so_peercred_of_a_socketpair() -> None:
    from gridvm.api.audit import peer_of

    a, b = socket.socketpair()
    with a, b:
        class T:
            def get_extra_info(self, name: str) -> Any:
                return a if name == "socket" else None

        who = peer_of(T())  # type: ignore[arg-type]
    assert who["uid"] == os.getuid() and who["pid"] == os.getpid()
