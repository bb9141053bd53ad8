"""gridvmd: the per-host agent. One per home; guests survive its restarts.

Upper layers add parts to it (`DaemonPart`: the web console) through `main(parts=…)`; the
`gridvmd` command (`gridvm.gridvmd`) is this daemon with every part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import fcntl
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from pyroute2 import netns as pyroute2_netns

from gridvm.api.app import make_app
from gridvm.api.audit import Audited, PeerProtocol
from gridvm.api.hostpeer import ApiPeers
from gridvm.api.listeners import Allowlist, PeerGuard, Sockets, bind_sockets
from gridvm.api.routes_db import db_router
from gridvm.api.routes_pki import enroll_app
from gridvm.api.routes_services import service_router
from gridvm.api.tasks import Tasks
from gridvm.api.tokens import TokenStore
from gridvm.cluster.node import ClusterNode
from gridvm.cluster.pki import Identity
from gridvm.cluster.settings import Files
from gridvm.cluster.vips import ClusterPeers
from gridvm.db.manager import DbManager
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager
from gridvm.host.networks import NetworkManager
from gridvm.lb.services import ServiceManager
from gridvm.paths import Home
from gridvm.provision.pygrub import PyGrub
from gridvm.store.sqlite import SqliteStore

log = logging.getLogger("gridvm.api")

WORKERS = 64        # threads for blocking work (kill -USR1 gridvmd logs their stacks)


@dataclass(frozen=True)
class Daemon:
    """What a part of gridvmd can use: the API app (with its routes, tasks and tokens)."""

    home: Home
    manager: HostManager
    node: ClusterNode     # cluster membership (consoles of domains on other hosts)
    app: Any              # the FastAPI app (ASGI)
    tasks: Tasks
    tokens: TokenStore


class SideServer(uvicorn.Server):
    """A server run beside the API's own: the API's server handles the signals for both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


Served = tuple[SideServer, list[socket.socket]]


class DaemonPart(Protocol):
    """A part an upper layer adds to gridvmd (e.g. the web console)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Its command-line options."""
        ...

    def configure(self, args: argparse.Namespace, home: Home) -> None:
        """Check its options and bind its sockets before the daemon runs (GridvmError)."""
        ...

    def attach(self, daemon: Daemon) -> list[Served]:
        """Add its routes to the app; servers of its own to run beside the API's."""
        ...


def _lock(home: Home) -> int:
    """Hold an exclusive lock on the home for the daemon's lifetime."""
    fd = os.open(home.root / "gridvmd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GridvmError(f"another gridvmd is already running with home {home.root}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _logging(home: Home, verbose: bool) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fh = logging.FileHandler(home.daemon_log)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    root.addHandler(sh)
    if fh.stream is not None:
        faulthandler.register(signal.SIGUSR1, file=fh.stream, all_threads=True)  # stacks
    for noisy in ("qemu", "pyroute2", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down, which kills the process before
    `serve` can close the store and remove the socket: catch them and return instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class TcpListeners:
    """The API over mutual TLS and the enrolment port, served once the host has a
    certificate; the CRL is reloaded into the live TLS context when it changes."""

    def __init__(self, socks: Sockets, identity: Identity) -> None:
        self.socks = socks
        self.identity = identity
        self.api_app: Any = None
        self.enroll_app: Any = None
        self._tls: ssl.SSLContext | None = None
        self._cert: bytes | None = None
        self._bg: set[asyncio.Task[None]] = set()
        self._servers: list[tuple[SideServer, asyncio.Task[None]]] = []

    async def start(self) -> None:
        """Serve with the host's certificate; serve again if it changed (a host that was
        given a lab's certificate and then made or joined a cluster of its own)."""
        if self.socks.api is None or self.socks.enroll is None or not self.identity.exists():
            return
        cert = self.identity.cert.read_bytes()
        if self._servers and cert == self._cert:
            return
        if self._servers:
            await self.stop()
            self.socks.rebind()       # the old listening sockets were closed with them
        self._cert = cert
        self._tls = self.identity.server_context()
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)      # enrolment: no client certificate
        plain.minimum_version = ssl.TLSVersion.TLSv1_2
        plain.load_cert_chain(self.identity.cert, self.identity.key)
        for app, sock, ctx in ((self.api_app, self.socks.api, self._tls),
                               (self.enroll_app, self.socks.enroll, plain)):
            config = uvicorn.Config(app, lifespan="off", log_level="warning",
                                    timeout_graceful_shutdown=5, http=PeerProtocol)
            config.load()
            config.ssl = ctx
            server = SideServer(config)
            self._servers.append((server, asyncio.create_task(server.serve(sockets=[sock]))))
        log.info("serving the API on %s (mutual TLS) and enrolment on port %d", self.socks.url,
                 self.socks.port + 1)

    async def start_soon(self) -> None:
        """`start` in the background (a request arriving over the TCP API must not wait for
        its own server to be replaced), waiting for it a little."""
        task = asyncio.create_task(self.start())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 2)

    def reload_crl(self) -> None:
        if self._tls is not None and self.identity.crl.exists():
            self._tls.load_verify_locations(cafile=str(self.identity.crl))
            self._tls.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            log.info("certificate revocation list reloaded")

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        for _, task in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        self._servers.clear()


async def serve(home: Home, accel: str, socks: Sockets, allow: Allowlist,
                parts: Sequence[DaemonPart] = ()) -> None:
    """Serve the API on the Unix socket and, with --listen, on TCP (mutual TLS), and
    whatever `parts` add."""
    # Blocking work (etcd, peers, QEMU images) runs in threads; Python's default pool (CPUs +
    # 4) lets a few slow peer calls queue the cluster heartbeat behind them.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gridvmd"))
    store = SqliteStore(home.db)
    manager = HostManager(home, store, accel=accel)
    manager.net = net = NetworkManager(home, store)
    manager.bootloader = PyGrub()
    await net.start()  # rebuild networks and reconcile leftovers before domains are adopted
    identity = Files(home).identity
    tcp = TcpListeners(socks, identity)
    node = ClusterNode(manager, url=socks.url, address=socks.address,
                       on_identity=tcp.start_soon)
    peers = ApiPeers(identity, node.url_of)
    node.peers = peers

    def crl_changed() -> None:
        tcp.reload_crl()
        peers.reload()

    node.on_crl = crl_changed
    services = ServiceManager(manager, ClusterPeers(manager))
    app = make_app(manager, node)
    app.include_router(service_router(services))
    databases = DbManager(manager, node, services)
    app.include_router(db_router(databases))
    app.state.evacuations.hooks.append(databases)
    daemon = Daemon(home, manager, node, app, app.state.tasks, app.state.tokens)
    side = [served for part in parts for served in part.attach(daemon)]
    audit = app.state.audit
    tcp.api_app = Audited(PeerGuard(app, allow), audit)
    tcp.enroll_app = Audited(enroll_app(node), audit)
    await services.start()  # health checks; the nft table and VIPs outlive the daemon
    await databases.start()  # controllers of the databases whose writer VIP is ours
    config = uvicorn.Config(Audited(app, audit), uds=str(home.api_socket), log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=5, http=PeerProtocol)
    server = _Server(config)
    side_tasks = [asyncio.create_task(s.serve(sockets=ss)) for s, ss in side]
    try:
        await server.serve(sockets=[socks.unix])
    finally:
        for s, _ in side:
            s.should_exit = True
        await asyncio.gather(*side_tasks, return_exceptions=True)
        await tcp.stop()
        await databases.close()
        await services.close()
        home.api_socket.unlink(missing_ok=True)
        store.close()


def main(argv: list[str] | None = None, parts: Sequence[DaemonPart] = ()) -> None:
    parser = argparse.ArgumentParser(prog="gridvmd", description="gridvmd: the per-host "
                                     "agent. One per home; guests survive its restarts.")
    parser.add_argument("--home", help="state directory (default $GRIDVM_HOME or /var/lib/gridvm)")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                        default=os.environ.get("GRIDVM_ACCEL", "auto"))
    parser.add_argument("--netns", help="run inside this network namespace (lab hosts)")
    parser.add_argument("--listen", metavar="ADDR[:PORT]", default=os.environ.get("GRIDVM_LISTEN"),
                        help="serve the API to the cluster's hosts on this address: HTTPS "
                        "with mutual TLS on PORT (8002), enrolment of new hosts on PORT+1; "
                        "needed to be in a cluster or to migrate")
    parser.add_argument("--relocation-hosts-allow", metavar="LIST",
                        default=os.environ.get("GRIDVM_RELOCATION_HOSTS_ALLOW", ""),
                        help="peers allowed on the TCP API: IPs, CIDRs or regexes "
                        "(default: any peer with a certificate of the cluster)")
    parser.add_argument("-v", "--verbose", action="store_true")
    for part in parts:
        part.add_arguments(parser)
    args = parser.parse_args(argv)
    home = Home.resolve(args.home)
    try:
        if args.netns:
            # Before any thread exists, so the whole daemon and its QEMUs live there.
            pyroute2_netns.setns(args.netns, flags=0)
        home.ensure()
        home.secure()
        lock = _lock(home)
        allow = Allowlist(args.relocation_hosts_allow)
        socks = bind_sockets(home, args.listen)          # checks --listen
        for part in parts:
            part.configure(args, home)
    except (GridvmError, OSError) as exc:
        print(f"gridvmd: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    _logging(home, args.verbose)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(serve(home, args.accel, socks, allow, parts))
    finally:
        socks.close()
        os.close(lock)


if __name__ == "__main__":
    main()
