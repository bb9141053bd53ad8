"""Backups, restores and snapshots: gridvm against the same operations done by hand with QMP
and qemu-img, side by side in one run.

A tiny guest with a 1 GiB qcow2 data disk holding --data MiB of random data (written on the
host before boot) runs twice in a private network namespace: once managed by gridvm, once as
a raw QEMU started by hand from the same command line (its own copy of the disk). Then:

  full backup     gridvm backup --full (chunk store)  | QMP drive-backup sync=full to qcow2,
                                                        starting a persistent dirty bitmap
  incremental     the guest writes 8 MiB, then:
                  gridvm backup                       | drive-backup sync=incremental
  dedup           a second full backup: what the store grows by | a second qcow2 file
  restore         gridvm backup restore (new domain)  | qemu-img convert of the backup chain
  snapshot stall  gridvm snapshot create: freeze → thaw (without an agent: the snapshot
                  transaction) | blockdev-snapshot-internal-sync by hand (inside
                  guest-fsfreeze-freeze/-thaw by hand with --agent)

Throughput is over the guest-visible bytes each side read or wrote; ratios are gridvm/hand.
`--agent` adds a Debian guest with qemu-guest-agent per side (from the test image cache,
$GRIDVM_TEST_IMAGES) for the stall with a real filesystem freeze.

    sudo .venv/bin/python bench/backup.py [--data 256] [--rounds 5] [--agent] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gridvm.config.model import DiskSpec, DomainConfig, NetParams, VifSpec
from gridvm.host import httpprobe, links, netdevs, netns, procs
from gridvm.images.store import get_image
from gridvm.images.tiny import build_tiny
from gridvm.lab.agent import Agent
from gridvm.qemu.argv import build_argv, drive_id
from gridvm.qemu.guestagent import GuestAgent
from gridvm.qemu.qmp import Monitor

SUBNET = "10.57.0"
MIB = 1 << 20
DISK = 1 << 30


def du(path: Path) -> int:
    """Bytes a file or directory takes on disk."""
    out = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def make_disk(path: Path, data_mib: int) -> None:
    """A 1 GiB qcow2 whose first `data_mib` MiB are random."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(data_mib):
            f.write(os.urandom(MIB))
        f.truncate(DISK)
    procs.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
              timeout=600)
    raw.unlink()


def config(name: str, image: Any, disk: Path, ip: str, mac: str) -> DomainConfig:
    return DomainConfig(name=name, memory=128, kernel=str(image.kernel),
                        ramdisk=str(image.ramdisk),
                        disks=[DiskSpec(target=str(disk), vdev="xvda", format="qcow2")],
                        vifs=[VifSpec(bridge="xenbr0", mac=mac)],
                        net=NetParams(ip=ip, netmask="255.255.255.0", hostname=name))


class Hand:
    """A raw QEMU started by hand from gridvm's argv, driven over QMP."""

    def __init__(self, qemu: str, cfg: DomainConfig, ns: str, rundir: Path) -> None:
        self.rundir, self.ns, self.cfg = rundir, ns, cfg
        rundir.mkdir(parents=True)
        tap = f"hand{os.getpid() % 10000}"
        netns.call_in(ns, lambda: links.create_tap(tap, "xenbr0", None, None))
        self.tap = tap
        argv = build_argv(qemu, cfg, accel="tcg", rundir=rundir, taps=[tap])
        subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, timeout=60)
        self.mon = Monitor("bench", rundir / "qmp.sock")
        self.node = ""

    async def start(self) -> None:
        await self.mon.connect()
        blocks = await self.mon.execute("query-block")
        self.node = next(b["inserted"]["node-name"] for b in blocks
                         if b["device"] == drive_id("xvda"))

    async def job(self, actions: list[dict[str, Any]]) -> float:
        """Run a transaction that starts one backup job; seconds until it completed."""
        started = time.monotonic()
        async with self.mon.listen("BLOCK_JOB_COMPLETED") as events:
            await self.mon.execute("transaction", {"actions": actions})
            event = dict(await asyncio.wait_for(events.get(), 1200))
        if event.get("data", {}).get("error"):
            raise RuntimeError(f"backup job failed: {event['data']['error']}")
        return time.monotonic() - started

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.mon.execute("quit")
        await self.mon.close()
        pid = procs.read_pidfile(self.rundir / "qemu.pid")
        if pid:
            with contextlib.suppress(Exception):
                await procs.kill_and_wait(pid, timeout=5)
        with contextlib.suppress(Exception):
            netns.call_in(self.ns, lambda: links.delete_link(self.tap, None))


async def bench_tiny(agent: Agent, work: Path, ns: str, data_mib: int,
                     rounds: int) -> dict[str, Any]:
    image = build_tiny(agent.home.images)
    disk_g, disk_h = work / "gridvm.qcow2", work / "hand.qcow2"
    make_disk(disk_g, data_mib)
    shutil.copy(disk_g, disk_h)
    cfg_g = config("bg", image, disk_g, f"{SUBNET}.10", "00:16:3e:57:00:10")
    cfg_h = config("bh", image, disk_h, f"{SUBNET}.11", "00:16:3e:57:00:11")
    c = agent.client()
    c.post("/domains", {"config": cfg_g.model_dump(mode="json")})
    hand = Hand(c.get("/info")["qemu"], cfg_h, ns, work / "hand-run")
    await hand.start()
    for ip in (f"{SUBNET}.10", f"{SUBNET}.11"):
        httpprobe.wait_http(ip, "/health", ns=ns, timeout=300)
    store = work / "store"
    out: dict[str, Any] = {"data_mib": data_mib}
    try:
        # full
        t = time.monotonic()
        full = c.post("/domains/bg/backup", {"store": str(store), "full": True}, timeout=3600)
        g_full = time.monotonic() - t
        h_full = await hand.job([
            {"type": "block-dirty-bitmap-add", "data": {"node": hand.node, "name": "hand",
                                                        "persistent": True}},
            {"type": "drive-backup", "data": {"job-id": "full", "device": hand.node,
                                              "target": str(work / "full.qcow2"),
                                              "format": "qcow2", "sync": "full"}}])
        out["full"] = {"gridvm_s": g_full, "hand_s": h_full, "gridvm_read": full["read"],
                       "gridvm_mibs": full["read"] / MIB / g_full,
                       "hand_mibs": data_mib / h_full}
        # incremental after 8 MiB written by each guest
        for ip in (f"{SUBNET}.10", f"{SUBNET}.11"):
            httpprobe.get(ip, "/fill?mb=8", ns=ns, timeout=120)
        t = time.monotonic()
        inc = c.post("/domains/bg/backup", {"store": str(store)}, timeout=3600)
        g_inc = time.monotonic() - t
        procs.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                   str(work / "full.qcow2"), str(work / "inc.qcow2"), str(DISK)])
        h_inc = await hand.job([{"type": "drive-backup", "data": {
            "job-id": "inc", "device": hand.node, "target": str(work / "inc.qcow2"),
            "format": "qcow2", "sync": "incremental", "bitmap": "hand", "mode": "existing"}}])
        out["incremental"] = {"gridvm_s": g_inc, "hand_s": h_inc, "gridvm_read": inc["read"],
                              "gridvm_mode": inc["mode"], "hand_file": du(work / "inc.qcow2")}
        # a second full: what it adds
        before = du(store / "chunks")
        c.post("/domains/bg/backup", {"store": str(store), "full": True}, timeout=3600)
        await hand.job([{"type": "drive-backup", "data": {
            "job-id": "full2", "device": hand.node, "target": str(work / "full2.qcow2"),
            "format": "qcow2", "sync": "full"}}])
        listing = c.get("/backups", params={"store": str(store)})
        hand_bytes = sum(du(work / f) for f in ("full.qcow2", "inc.qcow2", "full2.qcow2"))
        out["dedup"] = {"gridvm_second_full_adds": du(store / "chunks") - before,
                        "hand_second_full_adds": du(work / "full2.qcow2"),
                        "gridvm_stored": listing["chunk_bytes"], "hand_stored": hand_bytes,
                        "guest_data": (data_mib + 8) * MIB * 3}
        # restore
        t = time.monotonic()
        res = c.post("/backups/restore", {"store": str(store), "id": inc["id"], "name": "br",
                                          "dir": str(work / "restored")}, timeout=3600)
        g_res = time.monotonic() - t
        t = time.monotonic()
        procs.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(work / "inc.qcow2"),
                   str(work / "hand-restored.qcow2")], timeout=3600)
        h_res = time.monotonic() - t
        out["restore"] = {"gridvm_s": g_res, "hand_s": h_res, "written": res["written"],
                          "gridvm_mibs": res["written"] / MIB / g_res,
                          "hand_mibs": res["written"] / MIB / h_res}
        c.delete("/domains/br")
        # snapshot stall
        g_stall, h_stall = [], []
        for i in range(rounds):
            snap = c.post("/domains/bg/snapshots", {"name": f"s{i}"}, timeout=600)
            g_stall.append(snap["stall_ms"])
            t = time.monotonic()
            await hand.mon.execute("transaction", {"actions": [
                {"type": "blockdev-snapshot-internal-sync",
                 "data": {"device": hand.node, "name": f"s{i}"}}]})
            h_stall.append((time.monotonic() - t) * 1000)
        out["stall"] = {"consistency": snap["consistency"], "gridvm_ms": g_stall,
                        "hand_ms": h_stall}
    finally:
        with contextlib.suppress(Exception):
            c.post("/domains/bg/destroy")
        await hand.close()
        c.close()
    return out


async def bench_agent(agent: Agent, work: Path, ns: str, rounds: int) -> dict[str, Any]:
    """The stall with a filesystem freeze: a Debian guest with qemu-guest-agent per side."""
    image = get_image(agent.home.images, "gvtest-amd64")
    assert image.disk is not None
    cfgs = []
    for side in ("g", "h"):
        disk = work / f"deb-{side}.qcow2"
        procs.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                   str(image.disk), str(disk)])
        cfgs.append(DomainConfig(name=f"deb{side}", memory=512, kernel=str(image.kernel),
                                 ramdisk=str(image.ramdisk), cmdline=image.cmdline,
                                 disks=[DiskSpec(target=str(disk), vdev="xvda",
                                                 format="qcow2")],
                                 vifs=[VifSpec(bridge="xenbr0")]))
    c = agent.client()
    c.post("/domains", {"config": cfgs[0].model_dump(mode="json")})
    hand = Hand(c.get("/info")["qemu"], cfgs[1].model_copy(update={
        "vifs": [VifSpec(bridge="xenbr0", mac="00:16:3e:57:00:21")]}), ns, work / "deb-run")
    await hand.start()
    try:
        deadline = time.monotonic() + 900
        while True:
            with contextlib.suppress(Exception):
                c.post("/domains/debg/guest-exec", {"argv": ["true"]}, timeout=30)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Debian guest's agent did not answer")
            time.sleep(2)
        g, h = [], []
        for i in range(rounds):
            snap = c.post("/domains/debg/snapshots", {"name": f"f{i}"}, timeout=600)
            assert snap["consistency"] == "frozen"
            g.append(snap["stall_ms"])
            async with GuestAgent(hand.rundir / "qga.sock", timeout=120) as ga:
                t = time.monotonic()
                await ga.fsfreeze()
                await hand.mon.execute("transaction", {"actions": [
                    {"type": "blockdev-snapshot-internal-sync",
                     "data": {"device": hand.node, "name": f"f{i}"}}]})
                await ga.fsthaw()
                h.append((time.monotonic() - t) * 1000)
        return {"gridvm_ms": g, "hand_ms": h}
    finally:
        with contextlib.suppress(Exception):
            c.post("/domains/debg/destroy")
        await hand.close()
        c.close()


def report(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r, indent=2))
        return
    med = statistics.median
    f, i, d, s = r["full"], r["incremental"], r["dedup"], r["restore"]
    print(f"guest data: {r['data_mib']} MiB random in a 1 GiB qcow2 disk (TCG guests)")
    print(f"full backup:        gridvm {f['gridvm_s']:6.2f} s ({f['gridvm_mibs']:6.1f} MiB/s)"
          f"   by hand {f['hand_s']:6.2f} s ({f['hand_mibs']:6.1f} MiB/s)"
          f"   ratio {f['gridvm_s'] / f['hand_s']:.2f}")
    print(f"incremental (8 MiB):gridvm {i['gridvm_s']:6.2f} s, read {i['gridvm_read'] / MIB:.0f} "
          f"MiB ({i['gridvm_mode']})   by hand {i['hand_s']:6.2f} s, file "
          f"{i['hand_file'] / MIB:.1f} MiB   ratio {i['gridvm_s'] / i['hand_s']:.2f}")
    print(f"second full adds:   gridvm {d['gridvm_second_full_adds'] / MIB:6.2f} MiB"
          f"   by hand {d['hand_second_full_adds'] / MIB:6.1f} MiB")
    print(f"3 backups stored:   gridvm {d['gridvm_stored'] / MIB:6.1f} MiB"
          f"   by hand {d['hand_stored'] / MIB:6.1f} MiB   (guest data "
          f"{d['guest_data'] / MIB:.0f} MiB: dedup {d['guest_data'] / d['gridvm_stored']:.2f}x"
          f" vs {d['guest_data'] / d['hand_stored']:.2f}x)")
    print(f"restore:            gridvm {s['gridvm_s']:6.2f} s ({s['gridvm_mibs']:6.1f} MiB/s)"
          f"   by hand {s['hand_s']:6.2f} s ({s['hand_mibs']:6.1f} MiB/s)"
          f"   ratio {s['gridvm_s'] / s['hand_s']:.2f}")
    st = r["stall"]
    print(f"snapshot stall ({st['consistency']}): gridvm median {med(st['gridvm_ms']):.1f} ms"
          f"   by hand {med(st['hand_ms']):.1f} ms")
    if "agent" in r:
        a = r["agent"]
        print(f"snapshot stall, freeze→thaw (Debian, agent): gridvm median "
              f"{med(a['gridvm_ms']):.1f} ms   by hand {med(a['hand_ms']):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=int, default=256, help="MiB of random data on the disk")
    ap.add_argument("--rounds", type=int, default=5, help="snapshots per side")
    ap.add_argument("--agent", action="store_true", help="also a Debian guest with an agent")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/backup.py needs root (namespaces, taps)")
    work = Path(tempfile.mkdtemp(prefix="gridvm-bench-backup-"))
    ns = f"gvbackup{os.getpid()}"
    netns.create(ns)
    images = os.environ.get("GRIDVM_TEST_IMAGES", "/var/cache/gridvm/test-images")
    agent = Agent(work / "home", ns=ns, accel="tcg", images=Path(images))
    try:
        netns.call_in(ns, lambda: netdevs.host_bridge("xenbr0", f"{SUBNET}.1/24"))
        agent.start()
        result = asyncio.run(bench_tiny(agent, work, ns, args.data, args.rounds))
        if args.agent:
            result["agent"] = asyncio.run(bench_agent(agent, work, ns, args.rounds))
        report(result, args.json)
    finally:
        with contextlib.suppress(Exception):
            agent.destroy_all()
        agent.stop()
        netns.remove(ns)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
