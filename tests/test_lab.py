"""Labs: several hosts on this machine; `--host` reaches each one's daemon; `lab down`
leaves nothing behind (namespaces, links, processes, homes, state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netlab import new_lab

from gridvm.host import netns, procs
from gridvm.host.networks import RUN_ROOT, host_tag
from gridvm.images.store import ImageInfo
from gridvm.lab import lab as labmod
from gridvm.paths import Home

pytestmark = pytest.mark.guest


def processes_mentioning(text: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and procs.pid_alive(int(p.name)) and any(text in a for a in procs.cmdline(int(p.name)))]


def test_lab_up_status_host_exec_and_leak_free_down(tiny_image: ImageInfo,
                                                    tmp_path: Path) -> None:
    lab = new_lab(tiny_image, tmp_path, hosts=2)
    st = json.loads(lab.gridvm("lab", "status", "--name", lab.name, "--json").stdout)
    assert st["subnet"] == "10.77.0.0/24" and st["ready"]
    hosts = {h["name"]: h for h in st["hosts"]}
    assert set(hosts) == {"h1", "h2"}
    assert hosts["h2"]["address"] == "10.77.0.12/24" and hosts["h2"]["network"] == "xenbr0"
    assert all(h["daemon"] == "running" for h in hosts.values())
    namespaces = [st["lan_namespace"], st["client"]["namespace"],
                  *(h["namespace"] for h in hosts.values())]
    assert all(netns.exists(ns) for ns in namespaces)

    # --host and GRIDVM_HOST reach each host's own daemon
    info = json.loads(lab.gridvm("info", "--json", host="h2").stdout)
    assert info["home"] == hosts["h2"]["home"]
    env = dict(os.environ, GRIDVM_HOME=str(lab.home), GRIDVM_HOST=f"{lab.name}/h1")
    out = subprocess.run([sys.executable, "-m", "gridvm", "info", "--json"], env=env,
                         text=True, capture_output=True, check=True).stdout
    assert json.loads(out)["home"] == hosts["h1"]["home"]
    assert "give either --home or --host" in lab.fails("--home", "/tmp", "info", host="h1")
    assert "is not in lab" in lab.fails("info", host="h9")

    # each host's LAN address sits on its bridge network, which enslaves eth0
    net = lab.network("h1", "xenbr0")
    assert net["uplink"] == "eth0" and net["addresses"] == ["10.77.0.11/24"]
    addrs = lab.gridvm("lab", "exec", "--name", lab.name, "h1", "--", "ip", "-o", "addr").stdout
    assert any(" xenbr0 " in f" {line} " and "inet 10.77.0.11/24" in line
               for line in addrs.splitlines()), addrs
    home = lab.gridvm("lab", "exec", "--name", lab.name, "h2", "--", "sh", "-c",
                      "echo $GRIDVM_HOME").stdout.strip()
    assert home == hosts["h2"]["home"]
    # the LAN joins the hosts and the client
    reach = lab.gridvm("lab", "exec", "--name", lab.name, "client", "--", sys.executable, "-c",
                       "import socket; s = socket.socket(); s.settimeout(3); "
                       "print(s.connect_ex(('10.77.0.12', 9)))").stdout.strip()
    assert reach == "111"  # connection refused: h2 answered across the LAN

    # a guest that is still running when the lab goes down is destroyed with it
    lab.create("h1", "left", "bridge=xenbr0")
    assert processes_mentioning(hosts["h1"]["home"])
    lab.gridvm("lab", "down", "--name", lab.name)
    assert not any(netns.exists(ns) for ns in namespaces)
    assert processes_mentioning(str(lab.home / "labs" / lab.name)) == []
    assert not (lab.home / "labs" / lab.name).exists()
    assert not labmod.state_path(lab.name).exists()
    for h in hosts.values():
        assert not (RUN_ROOT / "net" / host_tag(Home(Path(h["home"])))).exists()
    assert "no lab named" in lab.fails("lab", "status", "--name", lab.name)


def test_lab_errors(tiny_image: ImageInfo, tmp_path: Path) -> None:
    lab = new_lab(tiny_image, tmp_path, hosts=1)
    try:
        assert "is already up" in lab.fails("lab", "up", "--hosts", "1", "--name", lab.name)
        assert "invalid lab name" in lab.fails("lab", "up", "--name", "Bad_Name")
        assert "1 to 50 hosts" in lab.fails("lab", "up", "--hosts", "0", "--name", "zz")
        assert "has no host 'h7'" in lab.fails("lab", "exec", "--name", lab.name, "h7", "--",
                                              "true")
    finally:
        lab.gridvm("lab", "down", "--name", lab.name)
    assert "no lab named" in lab.fails("lab", "down", "--name", lab.name)
