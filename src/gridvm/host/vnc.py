"""A domain's VNC server (QEMU's, started from `-vnc`): the display check before start,
the password (set over QMP, never on the command line), and where to connect.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict
from gridvm.host.vm import Vm

BASE_PORT = 5900


def check_display(cfg: DomainConfig) -> None:
    """Refuse a fixed display whose port is taken (QEMU would fail with less to say)."""
    d = cfg.display
    if not d.vnc or d.search or d.display is None:
        return
    port = BASE_PORT + d.display
    family = socket.AF_INET6 if ":" in d.listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((d.listen, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(f"domain {cfg.name}: VNC display :{d.display} (port {port} on "
                               f"{d.listen}) is already in use; pick another vncdisplay or "
                               "set vncunused = 1") from None
            raise Conflict(f"domain {cfg.name}: cannot listen for VNC on {d.listen}:{port}: "
                           f"{exc.strerror}") from None


async def apply(vm: Vm) -> None:
    """On a freshly started QEMU: the VNC password, if the config has one."""
    d = vm.rec.config.display
    if d.vnc and d.password:
        await vm.monitor.execute("set_password", {"protocol": "vnc", "password": d.password})


async def display_of(vm: Vm) -> dict[str, Any]:
    """Where the domain's VNC server listens: host, port, display number, auth."""
    info = await vm.monitor.execute("query-vnc")
    if not info.get("enabled"):
        raise Conflict(f"domain {vm.name} has no VNC display (vnc = 1 in its config)")
    port = int(info["service"])
    host = str(info["host"])
    return {"host": host, "port": port, "display": port - BASE_PORT,
            "auth": info.get("auth", "none"), "password": bool(vm.rec.config.display.password),
            "clients": len(info.get("clients", []))}


def connect_address(host: str) -> str:
    """Where this host reaches a VNC server listening on `host` (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
