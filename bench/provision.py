"""Provisioning benchmark: build, sizes, clone, and boot to agent and to SSH, with gridvm's
clone path against the same QEMU started by hand on a copy of the image, side by side.

    sudo .venv/bin/python bench/provision.py [--rounds 2] [--arch amd64] [--images DIR]

1. cold build: `build_debian` of a small recipe into an empty image store (every package
   downloaded from the Debian archive), then the same build again (cached);
2. sizes: the disk's virtual size, the qcow2 file, and the raw disk's allocated blocks;
3. per round, interleaved: `gridvm clone TEMPLATE` (overlay + config + definition) and
   `gridvm start`, against `cp` of the template's qcow2 and the very argv gridvm ran
   (disk, tap, MAC, sockets swapped), QEMU started by hand: seconds from start to the guest
   agent running a command, and to the SSH banner on the guest's DHCP address.

Everything runs in a network namespace the benchmark creates (a NAT network inside it) and
removes; `--images DIR` reuses a store (the cold build is then skipped if it is cached).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from gridvm.config.macs import generate_mac
from gridvm.host import links, netns, procs
from gridvm.host.resources import remove_home_groups
from gridvm.lab.agent import Agent
from gridvm.provision import clone as clones
from gridvm.provision.debian import build_debian
from gridvm.provision.recipe import Recipe
from gridvm.qemu.confine import standalone_argv
from gridvm.qemu.guestagent import AgentError, GuestAgent

SUBNET = "10.57.0"
NET = "bnat"
RECIPE = Recipe(name="bench", disk_size="2G", hostname="bench")


def gridvm(home: Path, images: Path, *args: str) -> tuple[float, str]:
    env = dict(os.environ, GRIDVM_HOME=str(home), GRIDVM_IMAGES=str(images))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gridvm", *args], env=env, text=True,
                          capture_output=True, timeout=600)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"gridvm {' '.join(args)}: {proc.stderr.strip()}")
    return took, proc.stdout


def wait_ssh(ns: str, ip_of: Any, start: float, timeout: float = 300) -> float:
    """Seconds from `start` until the SSH banner arrives from the guest's address."""
    def banner(ip: str) -> bool:
        with socket.create_connection((ip, 22), timeout=1.0) as s:
            s.settimeout(2.0)
            return s.recv(64).startswith(b"SSH-")

    deadline = start + timeout
    while time.monotonic() < deadline:
        ip = ip_of()
        if ip:
            with contextlib.suppress(OSError):
                if netns.call_in(ns, lambda ip=ip: banner(ip)):
                    return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"no SSH banner within {timeout:.0f}s")


def wait_agent_socket(sock: Path, start: float, timeout: float = 300) -> float:
    async def once() -> bool:
        async with GuestAgent(sock, timeout=3) as ga:
            result = await ga.exec(["/bin/true"], timeout=10)
            return bool(result.returncode == 0)

    deadline = start + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(AgentError, OSError):
            if asyncio.run(once()):
                return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"no guest agent within {timeout:.0f}s")


def leases(agent: Agent) -> dict[str, str]:
    c = agent.client()
    try:
        return {le["mac"]: le["ip"] for le in c.get(f"/networks/{NET}")["leases"]}
    finally:
        c.close()


def gridvm_round(agent: Agent, images: Path, template: str, name: str, ns: str,
                 tmp: Path) -> dict[str, Any]:
    home = agent.home.root
    took_clone, out = gridvm(home, images, "clone", template, name, "--bridge", NET, "--json")
    inside = float(json.loads(out)["seconds"])   # without the CLI's own start-up
    c = agent.client()
    try:
        start = time.monotonic()
        view = c.post(f"/domains/{name}/start", {})
        mac = view["vifs"][0]["mac"]
        rundir = home / "run" / str(view["domid"])
        to_agent = wait_agent_socket(rundir / "qga.sock", start)
        to_ssh = wait_ssh(ns, lambda: leases(agent).get(mac), start)
        argv = procs.cmdline(int((rundir / "qemu.pid").read_text()))
        boot = tmp / f"{name}-boot"
        shutil.copytree(rundir / "boot", boot)   # pygrub's kernel, for the hand-run QEMU
        c.post(f"/domains/{name}/destroy")
    finally:
        c.close()
    return {"clone_s": took_clone, "clone_inside_s": inside, "agent_s": to_agent,
            "ssh_s": to_ssh, "argv": argv, "boot": boot, "rundir": rundir}


def hand_argv(argv: list[str], *, disk: Path, boot: Path, rundir: Path, tmp: Path,
              tap: str, mac: str) -> list[str]:
    """gridvm's QEMU command made stand-alone: its own disk copy, kernel, sockets, tap, MAC."""
    out: list[str] = []
    it = iter(standalone_argv(argv))
    for arg in it:
        if arg == "-daemonize":
            continue
        if arg in ("-pidfile", "-qmp"):
            next(it)
            continue
        if arg == "-serial":
            next(it)
            out += ["-serial", f"file:{tmp / 'hand-console.log'}"]
            continue
        if arg == "-chardev":
            value = next(it)
            if value.startswith("socket,id=ser0"):
                continue
            out += ["-chardev", value.replace(str(rundir / "qga.sock"), str(tmp / "hand.sock"))]
            continue
        if arg in ("-kernel", "-initrd"):
            out += [arg, str(boot / Path(next(it)).name)]
            continue
        if arg == "-uuid":
            out += [arg, str(uuid.uuid4())]
            next(it)
            continue
        parts = arg.split(",")
        if any(p.startswith("file=") and p.endswith(".qcow2") for p in parts):
            arg = ",".join(f"file={disk}" if p.startswith("file=") else p for p in parts)
        elif arg.startswith("tap,"):
            arg = ",".join(f"ifname={tap}" if p.startswith("ifname=") else p for p in parts)
        elif "mac=" in arg:
            arg = ",".join(f"mac={mac}" if p.startswith("mac=") else p for p in parts)
        out.append(arg)
    return out


def hand_round(agent: Agent, template_disk: Path, ref: dict[str, Any], ns: str,
               tmp: Path, bridge: str) -> dict[str, Any]:
    copy = tmp / "hand.qcow2"
    copy.unlink(missing_ok=True)
    start = time.monotonic()
    shutil.copyfile(template_disk, copy)
    took_copy = time.monotonic() - start
    mac = generate_mac()
    argv = hand_argv(ref["argv"], disk=copy, boot=ref["boot"], rundir=ref["rundir"], tmp=tmp,
                     tap="handtap0", mac=mac)
    (tmp / "hand.sock").unlink(missing_ok=True)
    netns.call_in(ns, lambda: links.create_tap("handtap0", bridge))
    start = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        to_agent = wait_agent_socket(tmp / "hand.sock", start)
        to_ssh = wait_ssh(ns, lambda: leases(agent).get(mac), start)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        netns.call_in(ns, lambda: links.delete_link("handtap0"))
        copy.unlink(missing_ok=True)
    return {"copy_s": took_copy, "agent_s": to_agent, "ssh_s": to_ssh}


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arch", default="amd64", choices=["amd64", "i386"])
    ap.add_argument("--images", type=Path, help="image store to reuse (default: a fresh one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gridvm-bench-prov-", dir="/var/tmp"))
    images = (args.images or tmp / "images").absolute()
    recipe = RECIPE.with_overrides(arch=args.arch)
    name = f"bench-{args.arch}"
    report: dict[str, Any] = {"arch": args.arch}
    ns = f"gvbprov{os.getpid()}"
    agent: Agent | None = None
    try:
        was_cached = (images / name / "image.json").is_file()
        start = time.monotonic()
        info = build_debian(images, recipe, name=name)
        report["build_cold_s" if not was_cached else "build_reused_s"] = \
            time.monotonic() - start
        start = time.monotonic()
        info = build_debian(images, recipe, name=name)
        report["build_cached_s"] = time.monotonic() - start
        assert info.disk is not None
        raw = tmp / "disk.raw"
        procs.run(["qemu-img", "convert", "-O", "raw", str(info.disk), str(raw)], timeout=600)
        report.update(virtual_mib=info.virtual_size >> 20, qcow2_mib=info.disk.stat().st_size
                      >> 20, raw_allocated_mib=allocated(raw) >> 20)
        raw.unlink()
        clones.mark_template(images, name)
        netns.create(ns)
        agent = Agent(tmp / "home", ns=ns, accel="tcg", images=images)
        agent.start()
        c = agent.client()
        c.post("/networks", {"name": NET, "mode": "nat", "subnet": f"{SUBNET}.0/24"})
        c.close()
        rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for i in range(args.rounds):
            g = gridvm_round(agent, images, name, f"bc{i}", ns, tmp)
            h = hand_round(agent, info.disk, g, ns, tmp, NET)
            rounds.append((g, h))
            print(f"round {i + 1}: gridvm clone {g['clone_s']:.2f} s, agent {g['agent_s']:.1f} s,"
                  f" ssh {g['ssh_s']:.1f} s | by hand: copy {h['copy_s']:.2f} s, agent "
                  f"{h['agent_s']:.1f} s, ssh {h['ssh_s']:.1f} s", file=sys.stderr)

        def med(side: int, key: str) -> float:
            return float(statistics.median(r[side][key] for r in rounds))

        report.update(
            rounds=args.rounds,
            gridvm_clone_s=med(0, "clone_s"), gridvm_clone_inside_s=med(0, "clone_inside_s"),
            gridvm_start_to_agent_s=med(0, "agent_s"),
            gridvm_start_to_ssh_s=med(0, "ssh_s"), hand_copy_s=med(1, "copy_s"),
            hand_start_to_agent_s=med(1, "agent_s"), hand_start_to_ssh_s=med(1, "ssh_s"))
        report["ratio_agent"] = report["gridvm_start_to_agent_s"] / report["hand_start_to_agent_s"]
        report["ratio_ssh"] = report["gridvm_start_to_ssh_s"] / report["hand_start_to_ssh_s"]
    finally:
        if agent is not None:
            with contextlib.suppress(Exception):
                agent.destroy_all()
            with contextlib.suppress(Exception):
                agent.client().delete(f"/networks/{NET}")
            agent.stop()
            remove_home_groups(agent.home)
        with contextlib.suppress(Exception):
            netns.remove(ns)
        with contextlib.suppress(Exception):
            clones.unmark_template(images, name)
        if args.images is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp / "home", ignore_errors=True)
            for p in tmp.glob("*"):
                if p.is_file():
                    p.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(render(report))


def render(r: dict[str, Any]) -> str:
    lines = [f"provisioning benchmark ({r['arch']}, TCG, medians of {r.get('rounds', 0)} "
             "interleaved rounds)"]
    if "build_cold_s" in r:
        first = f"  build, cold (empty store, all downloaded)     {r['build_cold_s']:8.1f} s"
    else:
        first = f"  build, store given (reused)                   {r['build_reused_s']:8.1f} s"
    lines.append(first)
    lines += [
        f"  build, cached (same recipe)                   {r['build_cached_s']:8.3f} s",
        f"  image: virtual {r['virtual_mib']} MiB, raw allocated {r['raw_allocated_mib']} MiB, "
        f"qcow2 {r['qcow2_mib']} MiB",
        f"  {'':44} {'gridvm':>9} {'by hand':>9} {'ratio':>6}",
        f"  new disk (gridvm clone command | cp qcow2)   {r['gridvm_clone_s']:8.2f}s "
        f"{r['hand_copy_s']:8.2f}s",
        f"    (the clone itself, without the CLI start-up {r['gridvm_clone_inside_s']:6.2f}s)",
        f"  start -> guest agent runs a command          {r['gridvm_start_to_agent_s']:8.1f}s "
        f"{r['hand_start_to_agent_s']:8.1f}s {r['ratio_agent']:6.2f}",
        f"  start -> SSH banner on its DHCP address      {r['gridvm_start_to_ssh_s']:8.1f}s "
        f"{r['hand_start_to_ssh_s']:8.1f}s {r['ratio_ssh']:6.2f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
