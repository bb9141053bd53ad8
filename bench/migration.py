"""Live migration between two lab hosts: gridvm against raw QEMU-to-QEMU, side by side.

Guests (the tiny image, bridged on the lab LAN, with a data disk): idle with 128 MiB, idle
with 512 MiB, and 128 MiB dirtying memory (a client on the LAN keeps calling /fill, which
writes random data through the guest's page cache to its disk, about 30 MiB/s under TCG).

For each kind, two such guests run at once: one managed by gridvm and migrated through the
source gridvmd's API (as `gridvm migrate --live` does), one as raw QEMUs started by hand from
the same argv and migrated with the same QMP capabilities and parameters (events,
return-path, validate-uuid, a 10 ms downtime limit, unlimited bandwidth), in a cgroup placed
and weighted as gridvm places its domains. Their migrations alternate (h1→h2→h1…), so both
see the same background load. Reported per migration: QEMU's downtime and total time
(`query-migrate` on the source), the end-to-end time (gridvm: API call until the source has
retired its copy; raw: destination QEMU spawned until `completed`), and the longest gap in
ICMP echo replies seen by a client on the LAN pinging the guest every 5 ms. Medians and
gridvm/raw ratios are printed.

    .venv/bin/python bench/migration.py [--runs 5] [--accel auto|kvm|tcg] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gridvm.api.client import Client
from gridvm.config.model import DiskSpec, DomainConfig, NetParams, Sched, VifSpec
from gridvm.host import httpprobe, links, netns, procs
from gridvm.host.cgroups import CgroupManager
from gridvm.host.migration import INITIAL_DOWNTIME_MS, MIB, RELOCATION_PORT, UNLIMITED_MIBS
from gridvm.images.tiny import build_tiny
from gridvm.lab import lab as labmod
from gridvm.paths import Home
from gridvm.qemu.argv import build_argv
from gridvm.qemu.qmp import Monitor

CAPS = {"events": True, "return-path": True, "validate-uuid": True}
PARAMS = {"downtime-limit": INITIAL_DOWNTIME_MS, "max-bandwidth": UNLIMITED_MIBS * MIB}
SETTLE_S = 3.0
SCENARIOS = (("idle 128 MiB", 128, False), ("idle 512 MiB", 512, False),
             ("dirtying 128 MiB", 128, True))


class Pinger:
    """ICMP echo requests every 5 ms from the lab's client namespace (a raw socket, so no
    ping binary is needed); keeps the arrival time of every reply."""

    def __init__(self, ns: str, ip: str) -> None:
        self.ip = ip
        self.sock = netns.call_in(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                             socket.IPPROTO_ICMP))
        self.sock.settimeout(0.1)
        self.ident = (os.getpid() + int(ipaddress.IPv4Address(ip))) & 0xFFFF
        self.replies: list[float] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._recv)]
        for th in self.threads:
            th.start()

    def _send(self) -> None:
        seq = 0
        while not self.stopped.is_set():
            seq = (seq + 1) & 0xFFFF
            body = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + b"gridvm-bench"
            with contextlib.suppress(OSError):
                self.sock.sendto(body[:2] + struct.pack("!H", _checksum(body)) + body[4:],
                                 (self.ip, 0))
            time.sleep(0.005)

    def _recv(self) -> None:
        while not self.stopped.is_set():
            try:
                data, (addr, _) = self.sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and ident == self.ident and addr == self.ip:
                self.replies.append(time.time())

    def gap_ms(self, start: float, end: float) -> float:
        """Longest time without a reply in [start, end] (wall clock)."""
        times = [start, *(t for t in self.replies if start <= t <= end), end]
        return max(b - a for a, b in zip(times, times[1:], strict=False)) * 1000

    def stop(self) -> None:
        self.stopped.set()
        for th in self.threads:
            th.join(timeout=5)
        self.sock.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class Dirtier:
    """A client calling /fill?mb=16 on the guest in a loop (from the client namespace)."""

    def __init__(self, ns: str, ip: str) -> None:
        self.ip = ip
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=lambda: netns.call_in(ns, self._run), daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(OSError):
                httpprobe.http_get(self.ip, "/fill?mb=16", timeout=30)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=60)


def guest_config(image: Any, name: str, memory: int, ip: str, prefix: int, mac: str,
                 disk: Path) -> DomainConfig:
    return DomainConfig(
        name=name, memory=memory, kernel=str(image.kernel), ramdisk=str(image.ramdisk),
        vifs=[VifSpec(bridge="xenbr0", mac=mac)], disks=[DiskSpec(target=str(disk), vdev="xvdb")],
        net=NetParams(ip=ip, hostname=name, netmask=str(
            ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)))


class Method(Protocol):
    def boot(self) -> None: ...

    def migrate(self, src: str, dst: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Gridvm:
    """Migrations through the source gridvmd's API, as `gridvm migrate --live` does them."""

    def __init__(self, state: labmod.LabState, cfg: DomainConfig) -> None:
        self.cfg = cfg
        self.clients = {h.name: Client(Home(Path(h.home)), timeout=300) for h in state.hosts}
        self.addr = {h.name: h.address.split("/")[0] for h in state.hosts}
        self.where = "h1"

    def boot(self) -> None:
        self.clients["h1"].post("/domains", {"config": self.cfg.model_dump(mode="json")})

    def migrate(self, src: str, dst: str) -> dict[str, Any]:
        t0 = time.time()
        job = self.clients[src].post(f"/domains/{self.cfg.name}/migrate", {
            "target": f"{self.addr[dst]}:{RELOCATION_PORT}", "live": True})
        while job["finished"] is None:      # slow polling: the daemon's clock times the job
            time.sleep(0.2)
            job = self.clients[src].get(f"/migrations/{job['id']}")
        if job["phase"] != "completed":
            raise RuntimeError(f"gridvm migration failed: {job['error']}")
        self.where = dst
        return {"downtime_ms": job["downtime_ms"], "total_ms": job["total_time_ms"],
                "setup_ms": job["setup_time_ms"],
                "e2e_ms": round((job["finished"] - t0) * 1000),
                "passes": job["ram"]["iterations"], "mbps": round(job["ram"]["mbps"])}

    def close(self) -> None:
        self.clients[self.where].post(f"/domains/{self.cfg.name}/destroy")
        for c in self.clients.values():
            c.close()


class RawQemu:
    """One QEMU started by hand in a host's namespace from gridvm's argv, with its own tap,
    in a cgroup placed and weighted as gridvm places its domains (a sibling group under
    gridvm/ with the default credit weight): both then compete for the CPU alike."""

    def __init__(self, qemu: str, cfg: DomainConfig, accel: str, ns: str, rundir: Path,
                 tap: str, incoming: bool, cg: CgroupManager) -> None:
        self.ns, self.tap, self.cg, self.group = ns, tap, cg, rundir.name
        rundir.mkdir(parents=True)
        netns.call_in(ns, lambda: links.create_tap(tap, "xenbr0"))
        argv = build_argv(qemu, cfg, accel=accel, rundir=rundir, taps=[tap], incoming=incoming)
        procs.run([*netns.exec_prefix(ns), *argv], timeout=60)
        pid = procs.read_pidfile(rundir / "qemu.pid")
        assert pid is not None
        self.pid = pid
        cg.create(self.group)
        cg.attach(self.group, pid)
        cg.set_weight(self.group, Sched().weight)
        self.mon = Monitor("bench", rundir / "qmp.sock")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.mon.execute("quit", timeout=5)
        await self.mon.close()
        await procs.kill_and_wait(self.pid, timeout=5)
        netns.call_in(self.ns, lambda: links.delete_link(self.tap))
        self.cg.remove(self.group)


class Raw:
    """The same guest as raw QEMUs: spawn the destination, migrate with the same settings."""

    def __init__(self, state: labmod.LabState, cfg: DomainConfig, qemu: str,
                 accel: str) -> None:
        self.cfg, self.qemu, self.accel = cfg, qemu, accel
        self.ns = {h.name: h.ns for h in state.hosts}
        self.addr = {h.name: h.address.split("/")[0] for h in state.hosts}
        self.base = Path(tempfile.mkdtemp(prefix="raw-", dir=state.root))
        self.count = 0
        self.loop = asyncio.Runner()
        self.src: RawQemu | None = None
        self.cg = CgroupManager(f"gridvm/{self.base.name.replace('_', '')}")

    def _spawn(self, host: str, incoming: bool) -> RawQemu:
        self.count += 1
        return RawQemu(self.qemu, self.cfg, self.accel, self.ns[host],
                       self.base / f"raw{self.count}", f"rawvif{self.count}", incoming,
                       self.cg)

    def boot(self) -> None:
        self.src = self._spawn("h1", False)
        self.loop.run(self.src.mon.connect())

    def migrate(self, src: str, dst: str) -> dict[str, Any]:
        return self.loop.run(self._migrate(dst))

    async def _migrate(self, dst_host: str) -> dict[str, Any]:
        src = self.src
        assert src is not None
        t0 = time.monotonic()
        dst = self._spawn(dst_host, True)
        await dst.mon.connect()
        caps = {"capabilities": [{"capability": k, "state": v} for k, v in CAPS.items()]}
        for q in (src, dst):
            await q.mon.execute("migrate-set-capabilities", caps)
        await src.mon.execute("migrate-set-parameters", PARAMS)
        address = self.addr[dst_host]
        await dst.mon.execute("migrate-incoming", {"uri": f"tcp:{address}:0"})
        port = (await dst.mon.execute("query-migrate"))["socket-address"][0]["port"]
        async with src.mon.listen("MIGRATION") as events:
            await src.mon.execute("migrate", {"uri": f"tcp:{address}:{port}"})
            while True:
                event = await asyncio.wait_for(events.get(), timeout=120)
                status = dict(event).get("data", {})["status"]
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise RuntimeError(f"raw migration {status}")
        e2e = time.monotonic() - t0
        while not (info := await src.mon.execute("query-migrate")).get("total-time"):
            await asyncio.sleep(0.01)
        await src.close()
        self.src = dst
        return {"downtime_ms": info["downtime"], "total_ms": info["total-time"],
                "setup_ms": info["setup-time"], "e2e_ms": round(e2e * 1000),
                "passes": info["ram"]["dirty-sync-count"], "mbps": round(info["ram"]["mbps"])}

    def close(self) -> None:
        if self.src is not None:
            self.loop.run(self.src.close())
        self.loop.close()
        self.cg.remove_parent()


def measure(methods: dict[str, Method], ips: dict[str, str], state: labmod.LabState,
            runs: int, dirty: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Boot each method's guest on h1, then `runs` rounds of one live migration per method
    (interleaved, so both see the same background load), h1→h2→h1…"""
    pingers = {k: Pinger(state.client.ns, ip) for k, ip in ips.items()}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in methods}
    booted: list[Method] = []
    try:
        for k, method in methods.items():
            method.boot()
            booted.append(method)
            httpprobe.wait_http(ips[k], ns=state.client.ns, timeout=180)
        time.sleep(SETTLE_S)
        hosts = ["h1", "h2"] * (runs // 2 + 1)
        for src, dst in list(zip(hosts, hosts[1:], strict=False))[:runs]:
            for k, method in methods.items():
                dirtier = Dirtier(state.client.ns, ips[k]) if dirty else None
                try:
                    if dirtier is not None:
                        time.sleep(SETTLE_S)
                    w0 = time.time()
                    row = method.migrate(src, dst)
                    time.sleep(1.0)          # replies just after the switch count too
                    row["gap_ms"] = round(pingers[k].gap_ms(w0, time.time()), 1)
                finally:
                    if dirtier is not None:
                        dirtier.stop()
                rows[k].append(row)
                say(f"  {k:<6} {src}→{dst}: {row}")
    finally:
        for method in booted:
            method.close()
        for pinger in pingers.values():
            pinger.stop()
    return rows


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def report(results: list[dict[str, Any]], accel: str, as_json: bool) -> None:
    keys = ("downtime_ms", "gap_ms", "total_ms", "e2e_ms", "setup_ms")
    summary = []
    for r in results:
        row: dict[str, Any] = {"guest": r["guest"]}
        for key in keys:
            g, w = median(r["gridvm"], key), median(r["raw"], key)
            row[key] = {"gridvm": g, "raw": w, "ratio": round(g / max(w, 0.001), 3)}
        summary.append(row)
    if as_json:
        print(json.dumps({"accel": accel, "summary": summary, "runs": results}, indent=2))
        return
    print(f"Live migration between two lab hosts ({accel}), medians of "
          f"{len(results[0]['gridvm'])} runs: gridvm / raw QEMU (ratio)")
    heads = ("QEMU downtime ms", "ping gap ms", "QEMU total ms", "end-to-end ms", "setup ms")
    print(f"{'guest':<17}" + "".join(f"{h:>22}" for h in heads))
    for s in summary:
        cells = [f"{s[k]['gridvm']:.0f} / {s[k]['raw']:.0f} ({s[k]['ratio']:.2f})"
                 for k in keys]
        print(f"{s['guest']:<17}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--runs", type=int, default=5, help="migrations per guest and method")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say: Callable[[str], None] = (lambda m: None) if args.json else (
        lambda m: print(m, file=sys.stderr, flush=True))
    home = Home.resolve()
    image = build_tiny(home.images)
    name = f"bm{os.getpid() % 100000}"
    state = labmod.plan(name, 2, root=Path(f"/tmp/gridvm-bench-{name}"), images=home.images,
                        accel=args.accel)
    labmod.up(state)
    lan = ipaddress.IPv4Network(state.subnet)
    results: list[dict[str, Any]] = []
    ips = {"gridvm": str(lan.network_address + 100), "raw": str(lan.network_address + 101)}
    macs = {"gridvm": "00:16:3e:4d:00:01", "raw": "00:16:3e:4d:00:02"}
    try:
        with contextlib.closing(Client(Home(Path(state.hosts[0].home)))) as c:
            info = c.get("/info")
        accel, qemu = info["accel"], info["qemu"]
        for label, memory, dirty in SCENARIOS:
            say(label)
            cfgs = {}
            for k in ("gridvm", "raw"):
                disk = Path(state.root) / f"{k}{memory}.img"
                procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "64M"])
                cfgs[k] = guest_config(image, f"{k}{memory}{'d' if dirty else ''}", memory,
                                       ips[k], lan.prefixlen, macs[k], disk)
            methods: dict[str, Method] = {"gridvm": Gridvm(state, cfgs["gridvm"]),
                                          "raw": Raw(state, cfgs["raw"], qemu, accel)}
            results.append({"guest": label,
                            **measure(methods, ips, state, args.runs, dirty, say)})
    finally:
        labmod.down(name)
    report(results, accel, args.json)


if __name__ == "__main__":
    main()
