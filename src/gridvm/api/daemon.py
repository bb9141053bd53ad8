"""gridvmd: the per-host agent. One per home; guests survive its restarts."""

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
from collections.abc import Iterator
from typing import Any

import uvicorn
from pyroute2 import netns as pyroute2_netns

from gridvm.api.app import make_app
from gridvm.api.relocation import Allowlist, RelocationGuard, bind_sockets, load_token
from gridvm.api.routes_services import service_router
from gridvm.cluster.vips import ClusterPeers
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager
from gridvm.host.networks import NetworkManager
from gridvm.lb.services import ServiceManager
from gridvm.paths import Home
from gridvm.provision.pygrub import PyGrub
from gridvm.store.sqlite import SqliteStore


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
                guard: tuple[str, Allowlist] | None = None) -> None:
    """Serve the API on `sockets` (Unix, and TCP with `guard` = (token, allowlist))."""
    store = SqliteStore(home.db)
    manager = HostManager(home, store, accel=accel)
    manager.net = net = NetworkManager(home, store)
    manager.bootloader = PyGrub()
    await net.start()  # rebuild networks and reconcile leftovers before domains are adopted
    sock = home.api_socket
    services = ServiceManager(manager, ClusterPeers(manager))
    app = make_app(manager)
    app.include_router(service_router(services))
    await services.start()  # health checks; the nft table and VIPs outlive the daemon
    asgi: Any = RelocationGuard(app, *guard) if guard else app
    config = uvicorn.Config(asgi, uds=str(sock), log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=5)
    server = _Server(config)
    try:
        await server.serve(sockets=sockets)
    finally:
        await services.close()
        sock.unlink(missing_ok=True)
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gridvmd", description=__doc__)
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
    except (GridvmError, OSError) as exc:
        print(f"gridvmd: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    _logging(home, args.verbose)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(serve(home, args.accel, sockets, guard))
    finally:
        os.close(lock)


if __name__ == "__main__":
    main()
