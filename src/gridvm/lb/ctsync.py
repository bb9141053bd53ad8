"""Connection synchronisation between directors: one conntrackd per clustered host.

LVS had its sync daemon; netfilter has conntrackd. Each director of a cluster runs one in
FTFW mode over multicast on its VIPs' LAN, so the VIP owner's connections (client → VIP,
DNATed to a backend and SNATed to the VIP, so backends answer whoever holds the VIP) are
mirrored in every standby's cache. A standby taking a VIP over commits that cache into its
kernel table before it adds the address: a request in flight through the dead owner then
completes through the new one (its backend's retransmitted answer and the client's next
segment find their entry there). Connections from or to the host's own addresses (etcd,
health checks, migrations) are not synchronised.

Like dnsmasq, conntrackd runs detached and outlives gridvmd; a restarted gridvmd adopts a
running conntrackd whose configuration is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from gridvm.errors import GridvmError
from gridvm.host import procs

log = logging.getLogger("gridvm.lb")

GROUP, PORT = "225.0.0.50", 3780          # conntrackd's documented multicast group and port


class ConnSync:
    """The conntrackd of one gridvmd home, its files under `rundir`."""

    def __init__(self, rundir: Path) -> None:
        self.dir = rundir

    def _path(self, suffix: str) -> Path:
        return self.dir / f"conntrackd.{suffix}"

    @property
    def conf(self) -> Path:
        return self._path("conf")

    def config_text(self, ifname: str, address: str, own: list[str]) -> str:
        ignore = "\n".join(f"      IPv4_address {a}" for a in sorted({"127.0.0.1", *own}))
        return f"""\
Sync {{
  Mode FTFW {{
  }}
  Multicast {{
    IPv4_address {GROUP}
    Group {PORT}
    IPv4_interface {address}
    Interface {ifname}
    SndSocketBuffer 1249280
    RcvSocketBuffer 1249280
    Checksum on
  }}
}}
General {{
  HashSize 8192
  HashLimit 65536
  LogFile {self._path("log")}
  Syslog off
  LockFile {self._path("lock")}
  UNIX {{
    Path {self._path("ctl")}
  }}
  NetlinkBufferSize 2097152
  NetlinkBufferSizeMaxGrowth 8388608
  Filter From Kernelspace {{
    Protocol Accept {{
      TCP
    }}
    Address Ignore {{
{ignore}
    }}
  }}
}}
"""

    def pid(self) -> int | None:
        """The pid of this home's running conntrackd, if any."""
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                argv = procs.cmdline(int(p.name))
                if argv and Path(argv[0]).name == "conntrackd" and str(self.conf) in argv:
                    return int(p.name)
        return None

    async def ensure(self, ifname: str, address: str, own: list[str]) -> None:
        """Run conntrackd on `ifname` (whose address is `address`), ignoring the host's `own`
        addresses: adopt a running one with this configuration, else (re)start it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        text = self.config_text(ifname, address, own)
        same = self.conf.exists() and self.conf.read_text() == text
        if same and await asyncio.to_thread(self.pid) is not None:
            return
        await self.stop()
        self.conf.write_text(text)
        try:
            await procs.arun(["conntrackd", "-C", str(self.conf), "-d"], timeout=15)
        except procs.CommandError as exc:
            raise GridvmError(f"conntrackd failed to start: {exc} "
                              f"(see {self._path('log')})") from exc
        log.info("conntrackd started on %s (pid %s)", ifname, await asyncio.to_thread(self.pid))

    async def take_over(self) -> None:
        """Becoming a VIP owner: commit the synchronised connections into the kernel, then
        start afresh from the kernel's table and send it to the others (keepalived's
        primary-backup.sh does the same)."""
        if await asyncio.to_thread(self.pid) is None:
            return
        for flag in ("-c", "-f", "-R", "-B"):
            try:
                await procs.arun(["conntrackd", "-C", str(self.conf), flag], timeout=10)
            except procs.CommandError as exc:
                log.warning("conntrackd %s: %s", flag, exc)

    async def stop(self) -> None:
        pid = await asyncio.to_thread(self.pid)
        if pid is not None:
            with contextlib.suppress(procs.CommandError):
                await procs.kill_and_wait(pid, timeout=3)
        self._path("lock").unlink(missing_ok=True)
        self._path("ctl").unlink(missing_ok=True)
