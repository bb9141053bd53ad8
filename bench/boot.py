"""Boot benchmark: `gridvm create` → guest answers HTTP, against the same QEMU command
launched by hand, side by side in one run (alternating rounds).

    sudo .venv/bin/python bench/boot.py [--rounds 7]

Everything runs inside a private network namespace that the benchmark creates and removes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gridvm.config.model import DomainConfig, NetParams, VifSpec
from gridvm.host import httpprobe, links, netdevs, netns, procs
from gridvm.images.tiny import build_tiny
from gridvm.lab.agent import Agent
from gridvm.paths import Home
from gridvm.qemu.confine import standalone_argv

SUBNET = "10.56.0"


def make_bridge(ns: str) -> None:
    netns.call_in(ns, lambda: netdevs.host_bridge("xenbr0", f"{SUBNET}.1/24"))


def wait_answer(ip: str, ns: str) -> None:
    httpprobe.wait_http(ip, "/health", ns=ns, timeout=120)


def gridvm_round(agent: Agent, cfg: DomainConfig, ns: str) -> tuple[float, list[str]]:
    client = agent.client()
    start = time.monotonic()
    view = client.post("/domains", {"config": cfg.model_dump(mode="json")})
    wait_answer(SUBNET + ".10", ns)
    elapsed = time.monotonic() - start
    argv = procs.cmdline(view["pid"])
    client.post(f"/domains/{cfg.name}/destroy")
    client.close()
    return elapsed, argv


def raw_argv(gridvm_argv: list[str], rundir: Path) -> list[str]:
    """The command gridvm ran, made stand-alone: no daemonizing, its own sockets and tap."""
    argv, skip = [], False
    plain = standalone_argv(gridvm_argv)
    dropped = {p.removeprefix("id=") for a in plain for p in a.split(",")
               if p.startswith("id=") and "socket," in a}      # chardevs on gridvm's sockets
    for arg in plain:
        if skip:
            skip = False
            continue
        if arg == "-daemonize":
            continue
        if arg in ("-pidfile", "-qmp", "-chardev", "-serial"):
            skip = True
            continue
        if any(f"chardev={c}" in arg.split(",") for c in dropped):   # e.g. the agent's port
            argv.pop()          # its "-device"
            continue
        if arg.startswith("tap,"):
            arg = ",".join(p if not p.startswith("ifname=") else "ifname=rawtap0"
                           for p in arg.split(","))
        argv.append(arg)
    return argv + ["-serial", f"file:{rundir / 'raw.console'}"]


def raw_round(argv: list[str], ns: str) -> float:
    netns.call_in(ns, lambda: links.create_tap("rawtap0", "xenbr0"))
    start = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_answer(SUBNET + ".10", ns)
        return time.monotonic() - start
    finally:
        proc.kill()
        proc.wait(timeout=10)
        netns.call_in(ns, lambda: links.delete_link("rawtap0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    images = Home.resolve().images
    img = build_tiny(images)
    ns = f"gvbench{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="gridvm-bench-"))
    agent = Agent(work / "home", ns=ns, accel="tcg", images=images)
    cfg = DomainConfig(name="bench1", kernel=str(img.kernel), ramdisk=str(img.ramdisk),
                       memory=128, vifs=[VifSpec(bridge="xenbr0", mac="00:16:3e:00:00:10")],
                       net=NetParams(ip=SUBNET + ".10", netmask="255.255.255.0",
                                     hostname="bench1"))
    gridvm_times: list[float] = []
    raw_times: list[float] = []
    try:
        netns.create(ns)
        make_bridge(ns)
        agent.start()
        gridvm_round(agent, cfg, ns)  # warm the page cache
        for n in range(args.rounds):
            g, argv = gridvm_round(agent, cfg, ns)
            r = raw_round(raw_argv(argv, work), ns)
            gridvm_times.append(g)
            raw_times.append(r)
            print(f"round {n + 1}: gridvm {g * 1000:.0f} ms, raw qemu {r * 1000:.0f} ms",
                  flush=True)
    finally:
        agent.destroy_all()
        agent.stop()
        netns.remove(ns)
        shutil.rmtree(work, ignore_errors=True)
    g, r = statistics.median(gridvm_times), statistics.median(raw_times)
    print(f"median create->HTTP: gridvm {g * 1000:.0f} ms, raw QEMU {r * 1000:.0f} ms, "
          f"ratio {g / r:.3f}, overhead {(g - r) * 1000:+.0f} ms "
          f"(accel tcg, {args.rounds} rounds)")


if __name__ == "__main__":
    sys.exit(main())
