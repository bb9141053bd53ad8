"""The web console as a part of gridvmd (`gridvm.api.daemon.DaemonPart`).

Its routes are added to the API app, so the console is served on the Unix socket (e.g.
through `ssh -L 8006:/var/lib/gridvm/gridvmd.sock`), and with `gridvmd --web ADDR[:PORT]`
(port 8006 by default) also over HTTPS on TCP, where only the console is served: the rest of
the API never leaves the Unix socket.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import socket

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gridvm.api.audit import Audited, PeerProtocol
from gridvm.api.client import AppClient
from gridvm.api.daemon import Daemon, Served, SideServer
from gridvm.api.limits import reply_error
from gridvm.api.listeners import parse_listen
from gridvm.errors import GridvmError
from gridvm.paths import Home
from gridvm.web import assets
from gridvm.web.auth import PATH, Gate
from gridvm.web.console import console_routes
from gridvm.web.hub import Hub
from gridvm.web.routes import web_routes
from gridvm.web.tls import CertFiles, certificate

log = logging.getLogger("gridvm.web")

WEB_PORT = 8006
WEB_ENV = "GRIDVM_WEB"


def parse_web(text: str) -> tuple[str, int]:
    """`ADDR`, `ADDR:PORT`, `[V6]:PORT` → (address, port); the port defaults to 8006."""
    text = text.strip()
    if re.fullmatch(r"\[.*\]:\d+|[^:]+:\d+", text):
        return parse_listen(text)
    return parse_listen(f"[{text.strip('[]')}]:{WEB_PORT}" if ":" in text
                        else f"{text}:{WEB_PORT}")


class ConsoleOnly:
    """ASGI wrapper for the TCP listener: the console's paths only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] in ("http", "websocket") and path != "/" and path != PATH and \
                not path.startswith(PATH + "/"):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4404})
                return
            await reply_error(send, 404, "only the web console is served here")
            return
        await self.app(scope, receive, send)


class WebPart:
    """`gridvmd --web ADDR[:PORT]`: the browser console."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.cert: CertFiles | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--web", metavar="ADDR[:PORT]", default=os.environ.get(WEB_ENV),
                            help="serve the web console over HTTPS there (port 8006 by "
                            "default); it is always served on the Unix socket too")

    def configure(self, args: argparse.Namespace, home: Home) -> None:
        gone = assets.missing()
        if gone:
            log.warning("web console: front-end files missing (run scripts/setup.sh): %s",
                        ", ".join(gone))
        if not args.web:
            return
        host, port = parse_web(args.web)
        unspecified = ipaddress.ip_address(host).is_unspecified
        self.cert = certificate(home, [] if unspecified else [host])
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise GridvmError(f"cannot serve the web console on {args.web}: "
                              f"{exc.strerror}") from None
        sock.listen(128)
        self.sock = sock

    def attach(self, daemon: Daemon) -> list[Served]:
        api = AppClient(daemon.app)
        hub = Hub(api, daemon.manager, daemon.tasks)
        daemon.app.include_router(web_routes(api, hub, daemon.tokens))
        daemon.app.include_router(console_routes(api, Gate(daemon.tokens), daemon.manager,
                                                 daemon.node))
        if self.sock is None or self.cert is None:
            return []
        config = uvicorn.Config(Audited(ConsoleOnly(daemon.app), daemon.app.state.audit),
                                lifespan="off", log_level="warning", http=PeerProtocol,
                                ssl_certfile=str(self.cert.cert),
                                ssl_keyfile=str(self.cert.key), timeout_graceful_shutdown=3)
        where = self.sock.getsockname()
        log.info("web console on https://%s:%s/ui/ (%s certificate, SHA-256 %s)",
                 where[0], where[1], "self-signed" if self.cert.self_signed else "CA-signed",
                 self.cert.fingerprint())
        return [(SideServer(config), [self.sock])]
