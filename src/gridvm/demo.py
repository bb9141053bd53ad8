"""`gridvm demo`: one FermiGrid host — four guests on one bridge, each answering HTTP.

Everything runs in a private network namespace (bridge, taps, guests and the HTTP checks),
with a daemon in a temporary home, and is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gridvm.config.xmfile import load_config
from gridvm.host import httpprobe, netdevs, netns
from gridvm.host.resources import remove_home_groups
from gridvm.images.tiny import build_tiny
from gridvm.lab.agent import Agent
from gridvm.paths import Home

GUESTS = ["fg5x1", "fg5x2", "fg5x3", "fg5x4"]
SUBNET = "10.55.0"

CONFIG = """\
# {name}: one of FermiGrid's four guests on host fg5 (xm style)
name    = "{name}"
memory  = 128
vcpus   = 1
kernel  = "{kernel}"
ramdisk = "{ramdisk}"
vif     = [ 'bridge=xenbr0' ]
ip      = "{ip}"
netmask = "255.255.255.0"
gateway = "{gw}"
hostname = name
on_crash = "restart"
"""


def run_demo(*, as_json: bool = False, keep: bool = False) -> dict[str, Any]:
    console = Console(stderr=as_json)
    images = Home.resolve().images
    report: dict[str, Any] = {"guests": []}
    t0 = time.monotonic()
    with console.status("building the tiny guest image (cached after the first run)") as st:
        img = build_tiny(images, log=lambda msg: st.update(f"image: {msg}"))
    ns = f"gvdemo{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="gridvm-demo-"))
    agent = Agent(workdir / "home", ns=ns, images=images)
    try:
        netns.create(ns)
        netns.call_in(ns, lambda: netdevs.host_bridge("xenbr0", f"{SUBNET}.1/24"))
        with console.status("starting gridvmd"):
            agent.start()
        client = agent.client()
        report["accel"] = client.get("/info")["accel"]
        for i, name in enumerate(GUESTS):
            path = workdir / f"{name}.cfg"
            path.write_text(CONFIG.format(name=name, kernel=img.kernel, ramdisk=img.ramdisk,
                                          ip=f"{SUBNET}.{11 + i}", gw=f"{SUBNET}.1"))
            cfg = load_config(path).config
            with console.status(f"gridvm create {path.name}"):
                view = client.post("/domains", {"config": cfg.model_dump(mode="json")})
            console.print(f"Started domain {name} (id={view['domid']})", highlight=False)
        for i, name in enumerate(GUESTS):
            ip = f"{SUBNET}.{11 + i}"
            start = time.monotonic()
            with console.status(f"waiting for {name} to answer HTTP at {ip}"):
                body = httpprobe.wait_http(ip, "/", ns=ns, timeout=120)
                health = httpprobe.get(ip, "/health", ns=ns)
            report["guests"].append({"name": name, "ip": ip, "hostname": body,
                                     "health": health,
                                     "answered_after_s": round(time.monotonic() - start, 2)})
        views = client.get("/domains")
        report["list"] = [{k: v[k] for k in ("name", "domid", "memory", "vcpus", "state",
                                             "cpu_time")} for v in views]
        if not as_json:
            _print_list(console, views)
            for g in report["guests"]:
                console.print(f"GET http://{g['ip']}/ -> {g['hostname']!r}, /health -> "
                              f"{g['health']!r}", highlight=False)
        report["seconds"] = round(time.monotonic() - t0, 1)
        if keep:
            console.print(f"left running: namespace {ns}, home {agent.home.root}")
            return report
    finally:
        if not keep:
            with console.status("cleaning up"):
                with contextlib.suppress(Exception):
                    agent.destroy_all()
                agent.stop()
                netns.remove(ns)
                remove_home_groups(agent.home)
                shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        console.print(f"demo finished in {report['seconds']} s; everything cleaned up.")
    return report


def _print_list(console: Console, views: list[dict[str, Any]]) -> None:
    table = Table(title="gridvm list", box=None)
    for col in ("Name", "ID", "Mem", "VCPUs", "State", "Time(s)"):
        table.add_column(col)
    for v in views:
        table.add_row(v["name"], str(v["domid"]), str(v["memory"]), str(v["vcpus"]),
                      v["state"], f"{v['cpu_time']:.1f}")
    console.print(table)
