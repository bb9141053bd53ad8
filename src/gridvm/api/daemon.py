"""gridvmd: the per-host agent. One per home; guests survive its restarts.

Upper layers add parts to it (`DaemonPart`: the web console) through `main(parts=…)`; the
`gridvmd` command (`gridvm.gridvmd`) is this daemon with every part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from pyroute2 import netns as pyroute2_netns

from gridvm.api.app import make_app
from gridvm.api.relocation import Allowlist, RelocationGuard, bind_sockets, load_token
from gridvm.api.routes_services import service_router
from gridvm.api.tasks import Tasks
from gridvm.api.tokens import TokenStore
from gridvm.cluster.vips import ClusterPeers
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager
from gridvm.host.networks import NetworkManager
from gridvm.lb.services import ServiceManager
from gridvm.paths import Home
from gridvm.store.sqlite import SqliteStore


@dataclass(frozen=True)
class Daemon:
    """What a part of gridvmd can use: the API app (with its routes, tasks and tokens)."""

    home: Home
    manager: HostManager
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


async def serve(home: Home, accel: str, sockets: list[socket.socket],
                guard: tuple[str, Allowlist] | None = None,
                parts: Sequence[DaemonPart] = ()) -> None:
    """Serve the API on `sockets` (Unix, and TCP with `guard` = (token, allowlist)), and
    whatever `parts` add."""
    store = SqliteStore(home.db)
    manager = HostManager(home, store, accel=accel)
    manager.net = net = NetworkManager(home, store)
    await net.start()  # rebuild networks and reconcile leftovers before domains are adopted
    sock = home.api_socket
    services = ServiceManager(manager, ClusterPeers(manager))
    app = make_app(manager)
    app.include_router(service_router(services))
    daemon = Daemon(home, manager, app, app.state.tasks, app.state.tokens)
    side = [served for part in parts for served in part.attach(daemon)]
    await services.start()  # health checks; the nft table and VIPs outlive the daemon
    asgi: Any = RelocationGuard(app, *guard) if guard else app
    config = uvicorn.Config(asgi, uds=str(sock), log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=5)
    server = _Server(config)
    side_tasks = [asyncio.create_task(s.serve(sockets=socks)) for s, socks in side]
    try:
        await server.serve(sockets=sockets)
    finally:
        for s, _ in side:
            s.should_exit = True
        await asyncio.gather(*side_tasks, return_exceptions=True)
        await services.close()
        sock.unlink(missing_ok=True)
        store.close()


def main(argv: list[str] | None = None, parts: Sequence[DaemonPart] = ()) -> None:
    parser = argparse.ArgumentParser(prog="gridvmd", description="gridvmd: the per-host "
                                     "agent. One per home; guests survive its restarts.")
    parser.add_argument("--home", help="state directory (default $GRIDVM_HOME or /var/lib/gridvm)")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                        default=os.environ.get("GRIDVM_ACCEL", "auto"))
    parser.add_argument("--netns", help="run inside this network namespace (lab hosts)")
    parser.add_argument("--listen", metavar="ADDR[:PORT]", default=os.environ.get("GRIDVM_LISTEN"),
                        help="also serve the relocation API on TCP (port 8002 by default; "
                        "needs the shared token in $GRIDVM_TOKEN or HOME/relocation.token)")
    parser.add_argument("--relocation-hosts-allow", metavar="LIST",
                        default=os.environ.get("GRIDVM_RELOCATION_HOSTS_ALLOW", ""),
                        help="peers allowed to migrate domains here: IPs, CIDRs or regexes "
                        "(default: any peer with the token)")
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
        sockets = bind_sockets(home, args.listen)          # checks --listen
        guard = (load_token(home, create=True), allow) if args.listen else None
        if args.listen:     # peers in a cluster ask where to migrate to (evacuate)
            os.environ["GRIDVM_LISTEN"] = args.listen
        for part in parts:
            part.configure(args, home)
    except (GridvmError, OSError) as exc:
        print(f"gridvmd: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    _logging(home, args.verbose)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(serve(home, args.accel, sockets, guard, parts))
    finally:
        os.close(lock)


if __name__ == "__main__":
    main()
