"""dnsmasq for one NAT network: DHCP (static leases by MAC) and DNS on its bridge.

Like QEMU, dnsmasq runs detached and outlives gridvmd: a restarted daemon adopts a running
dnsmasq whose configuration is unchanged and restarts it otherwise. Its files live in a
world-traversable run directory because dnsmasq drops privileges to `nobody` and re-reads
its hosts files as that user on SIGHUP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from gridvm.errors import GridvmError
from gridvm.host import procs

log = logging.getLogger("gridvm.dnsmasq")

LEASE_TIME = "1h"


@dataclass(frozen=True)
class DhcpHost:
    """A static lease: this MAC always gets this address and name."""

    mac: str
    ip: str
    name: str


@dataclass(frozen=True)
class Lease:
    """A lease dnsmasq handed out (from its lease file)."""

    mac: str
    ip: str
    hostname: str
    expires: int


class Dnsmasq:
    """The dnsmasq of network `name`, serving bridge `bridge` from `gateway`."""

    def __init__(self, rundir: Path, name: str, bridge: str,
                 gateway: ipaddress.IPv4Interface,
                 dynamic: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> None:
        self.dir = rundir
        self.name = name
        self.bridge = bridge
        self.gateway = gateway
        self.dynamic = dynamic

    def _path(self, suffix: str) -> Path:
        return self.dir / f"{self.name}.{suffix}"

    @property
    def conf(self) -> Path:
        return self._path("conf")

    @property
    def pidfile(self) -> Path:
        return self._path("pid")

    @property
    def leasefile(self) -> Path:
        return self._path("leases")

    def config_text(self) -> str:
        lo, hi = self.dynamic
        lines = [
            f"interface={self.bridge}", "bind-interfaces", "except-interface=lo",
            f"listen-address={self.gateway.ip}",
            f"dhcp-range={lo},{hi},{self.gateway.netmask},{LEASE_TIME}",
            f"dhcp-option=option:router,{self.gateway.ip}",
            f"dhcp-option=option:dns-server,{self.gateway.ip}",
            "dhcp-authoritative", "dhcp-no-override", "domain-needed", "bogus-priv",
            "no-hosts", "strict-order",
            f"pid-file={self.pidfile}", f"dhcp-leasefile={self.leasefile}",
            f"dhcp-hostsfile={self._path('hosts')}", f"addn-hosts={self._path('addn')}",
            f"log-facility={self._path('log')}", "user=nobody", "group=nogroup",
        ]
        return "\n".join(lines) + "\n"

    def pid(self) -> int | None:
        """The pid of this network's running dnsmasq, if any."""
        pid = procs.read_pidfile(self.pidfile)
        if pid is None or not procs.pid_alive(pid):
            return None
        argv = procs.cmdline(pid)
        if not argv or "dnsmasq" not in Path(argv[0]).name or f"--conf-file={self.conf}" \
                not in argv:
            return None
        return pid

    def write_hosts(self, hosts: list[DhcpHost]) -> bool:
        """Write the static leases (and their DNS names); True if anything changed."""
        dhcp = "".join(f"{h.mac},{h.ip},{h.name}\n" for h in hosts)
        addn = "".join(f"{h.ip} {h.name}\n" for h in hosts)
        changed = _write(self._path("hosts"), dhcp)
        return _write(self._path("addn"), addn) or changed

    async def ensure(self, hosts: list[DhcpHost]) -> None:
        """Run dnsmasq with the current config: adopt a matching one, else (re)start it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.write_hosts(hosts)
        conf_changed = _write(self.conf, self.config_text())
        pid = self.pid()
        if pid is not None and not conf_changed:
            os.kill(pid, signal.SIGHUP)
            log.info("%s: adopted dnsmasq pid %d", self.name, pid)
            return
        await self.stop(keep_files=True)
        self.leasefile.touch()
        try:
            await procs.arun(["dnsmasq", f"--conf-file={self.conf}"], timeout=15)
        except procs.CommandError as exc:
            raise GridvmError(f"network {self.name}: dnsmasq failed to start: {exc}") from exc
        if self.pid() is None:
            raise GridvmError(f"network {self.name}: dnsmasq did not stay up "
                              f"(see {self._path('log')})")
        log.info("%s: started dnsmasq pid %s", self.name, self.pid())

    async def reload(self, hosts: list[DhcpHost]) -> None:
        """Update the static leases; dnsmasq re-reads them on SIGHUP."""
        pid = self.pid()
        if self.write_hosts(hosts) and pid is not None:
            os.kill(pid, signal.SIGHUP)

    async def stop(self, *, keep_files: bool = False) -> None:
        """Stop dnsmasq (if it runs) and, unless told otherwise, remove its files."""
        pid = self.pid()
        if pid is not None:
            await procs.kill_and_wait(pid, timeout=3)
        self.pidfile.unlink(missing_ok=True)
        if not keep_files:
            for suffix in ("conf", "hosts", "addn", "leases", "log"):
                self._path(suffix).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # when it was the last network

    def leases(self) -> list[Lease]:
        """Current leases: `expiry mac ip hostname client-id` per line."""
        try:
            text = self.leasefile.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 4 and f[0].isascii() and f[0].isdigit():
                out.append(Lease(mac=f[1], ip=f[2], hostname="" if f[3] == "*" else f[3],
                                 expires=int(f[0])))
        return out


def _write(path: Path, text: str) -> bool:
    """Write `text` to `path` (world-readable) unless it already holds it."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    return True


async def stop_others(rundir: Path, keep: set[str]) -> None:
    """Stop the dnsmasq of every network in `rundir` not named in `keep`; remove its files."""
    if not rundir.is_dir():
        return
    for conf in rundir.glob("*.conf"):
        name = conf.stem
        if name in keep:
            continue
        log.info("%s: stopping the dnsmasq of a network that no longer exists", name)
        stale = Dnsmasq(rundir, name, "", ipaddress.IPv4Interface("0.0.0.0/32"),
                        (ipaddress.IPv4Address(0), ipaddress.IPv4Address(0)))
        await stale.stop()
