"""gridvm networks with real guests (TCG) in a two-host lab: bridged, NAT, isolation,
forwards, bad input, and reconciliation after a gridvmd crash."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab import LabEnv, lab_env

from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("netlab")) as env:
        yield env


def nft_ruleset(lab: LabEnv, host: str) -> str:
    return lab.run_in(host, "nft", "list", "ruleset")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_bridge_network_guests_reach_each_other_on_one_host_and_across_hosts(
        lab: LabEnv) -> None:
    ips = {name: lab.guest_ip(i) for i, name in enumerate(("g1", "g2", "g3"), 1)}
    for name, host in (("g1", "h1"), ("g2", "h1"), ("g3", "h2")):
        lab.create(host, name, "bridge=xenbr0", f'ip = "{ips[name]}"\nnetmask = "255.255.255.0"')
    for name, ip in ips.items():
        assert lab.wait_http(ip) == name
    assert lab.network("h1", "xenbr0")["domains"] == ["g1", "g2"]
    # same host, same bridge network
    assert lab.fetch(ips["g1"], f"http://{ips['g2']}/") == "status 200\ng2"
    # two hosts over the LAN, both ways
    assert lab.fetch(ips["g1"], f"http://{ips['g3']}/") == "status 200\ng3"
    assert lab.fetch(ips["g3"], f"http://{ips['g2']}/") == "status 200\ng2"
    for name, host in (("g1", "h1"), ("g2", "h1"), ("g3", "h2")):
        lab.gridvm("destroy", name, host=host)
    for host in ("h1", "h2"):
        assert [n for n in lab.links(host) if n.startswith("vif")] == []
        assert lab.pids(host, "qemu-system") == []


def test_nat_networks_dhcp_masquerade_forwards_isolation_and_crash_recovery(
        lab: LabEnv) -> None:
    h1 = lab.addr("h1")
    client = lab.state.client.address.split("/")[0]
    lab.gridvm("network", "create", "nat1", "--mode", "nat", "--subnet", "10.88.1.0/24",
               host="h1")
    lab.gridvm("network", "create", "nat2", "--mode", "nat", "--subnet", "10.88.2.0/24",
               host="h1")
    lab.create("h1", "n1", "bridge=nat1")                      # DHCP, address from gridvm
    lab.create("h1", "n2", "bridge=nat2,ip=10.88.2.50")         # vif ip= wins: a static lease
    lab.gridvm("network", "forward", "nat1", "8080", "n1:80", host="h1")
    lab.gridvm("network", "forward", "nat2", "8081", "n2:80", host="h1")

    # reachable through the forwards, from the LAN
    assert lab.wait_http(h1, port=8080) == "n1"
    assert lab.wait_http(h1, port=8081) == "n2"

    # DHCP: each guest got its static lease from dnsmasq
    n1_ip = lab.network("h1", "nat1")["hosts"][0]["ip"]
    assert n1_ip.startswith("10.88.1.")
    assert f"dhcp eth0 bound {n1_ip}" in lab.gridvm("dmesg", "-n", "5000", "n1", host="h1").stdout
    assert "dhcp eth0 bound 10.88.2.50" in lab.gridvm("dmesg", "-n", "5000", "n2",
                                                      host="h1").stdout
    # DNS: dnsmasq knows the network's domains by name
    assert lab.fetch(h1, "http://n1/", port=8080) == "status 200\nn1"

    # out: to a server on the host side, and masqueraded to the LAN
    with lab.http_server("h1", "10.88.1.1") as log:
        assert lab.fetch(h1, "http://10.88.1.1:8000/", port=8080).startswith("status 200")
        assert "10.88.1." in log.read_text()
    with lab.http_server("client", client) as log:
        assert lab.fetch(h1, f"http://{client}:8000/", port=8080).startswith("status 200")
        wait_for("the request in the log", lambda: "GET /" in log.read_text())
        assert re.search(rf"^{re.escape(h1)} ", log.read_text(), re.M), log.read_text()

    # not reachable otherwise: even a LAN client routing the NAT subnets via h1 gets nowhere
    lab.run_in("client", "ip", "route", "add", "10.88.0.0/16", "via", h1)
    with pytest.raises(OSError):
        lab.http(n1_ip, timeout=2)
    # and the two NAT networks cannot reach each other
    assert lab.fetch(h1, "http://10.88.2.50/", port=8080).startswith("status 0")
    assert lab.fetch(h1, f"http://{n1_ip}/", port=8081).startswith("status 0")

    # a network in use cannot go
    assert "in use by running domain(s) n1" in lab.fails("network", "delete", "nat1", host="h1")

    # gridvmd crashes; meanwhile dnsmasq dies, the nft table goes, a stale tap appears
    old_dnsmasq = lab.pids("h1", "dnsmasq")
    assert len(old_dnsmasq) == 2
    daemon = lab.state.host("h1").pid
    assert daemon is not None
    os.kill(daemon, signal.SIGKILL)
    for pid in old_dnsmasq:
        os.kill(pid, signal.SIGKILL)
    table = _table(lab, "h1")
    lab.run_in("h1", "nft", "delete", "table", "inet", table)
    lab.run_in("h1", "ip", "tuntap", "add", "vif99.0", "mode", "tap")
    lab.run_in("h1", "ip", "link", "set", "vif99.0", "master", "nat1")
    lab.gridvm("lab", "restart", "h1", "--name", lab.name)
    assert "vif99.0" not in lab.links("h1")
    assert len(lab.pids("h1", "dnsmasq")) == 2
    assert table in nft_ruleset(lab, "h1")
    assert lab.http(h1, port=8080) == "n1"               # the guest ran on; its forward is back
    assert lab.fetch(h1, "http://10.88.2.50/", port=8080).startswith("status 0")

    # removing a forward closes it
    lab.gridvm("network", "unforward", "nat1", "8080", host="h1")
    with pytest.raises(OSError):
        lab.http(h1, port=8080, timeout=2)

    # destroy and delete: nothing of the networks remains on h1
    lab.gridvm("destroy", "n1", host="h1")
    lab.gridvm("destroy", "n2", host="h1")
    lab.gridvm("network", "delete", "nat1", host="h1")
    lab.gridvm("network", "delete", "nat2", host="h1")
    links = lab.links("h1")
    assert not {"nat1", "nat2"} & set(links) and not [n for n in links if n.startswith("vif")]
    assert "gridvm" not in nft_ruleset(lab, "h1")
    assert lab.pids("h1", "dnsmasq") == [] and lab.pids("h1", "qemu-system") == []
    assert json.loads(lab.gridvm("network", "list", "--json", host="h1").stdout)[0]["name"] \
        == "xenbr0"


def _table(lab: LabEnv, host: str) -> str:
    found = re.search(r"table inet (gridvm_\w+)", nft_ruleset(lab, host))
    assert found, "no gridvm table"
    return found.group(1)


def test_bad_input_gets_one_line_errors_and_changes_nothing(lab: LabEnv) -> None:
    before = (sorted(lab.links("h1")), nft_ruleset(lab, "h1"),
              lab.gridvm("network", "list", "--json", host="h1").stdout)
    lab.gridvm("network", "create", "natx", "--mode", "nat", "--subnet", "10.90.0.0/16",
               host="h1")
    lab.gridvm("new", str(lab.write_cfg("b1", "bridge=xenbr0")), host="h1")  # defined only
    cases = {
        ("network", "create", "naty", "--mode", "nat", "--subnet", "10.90.5.0/24"):
            "overlaps network natx",
        ("network", "create", "naty", "--mode", "nat", "--subnet", "10.77.0.0/16"):
            "overlaps 10.77.0.11/24 on xenbr0",
        ("network", "create", "naty", "--mode", "nat", "--subnet", "10.91.0.1/24"):
            "host bits set",
        ("network", "create", "naty", "--mode", "nat"): "needs --subnet",
        ("network", "create", "natx", "--mode", "nat", "--subnet", "10.92.0.0/24"):
            "network 'natx' already exists",
        ("network", "create", "eth0", "--mode", "bridge"): "already exists on this host",
        ("network", "create", "br9", "--mode", "bridge", "--uplink", "eth9"):
            "uplink eth9 does not exist",
        ("network", "create", "br9", "--mode", "bridge", "--uplink", "eth0"):
            "uplink eth0 is already a port of xenbr0",
        ("network", "create", "br9", "--mode", "ovs"): "unknown network mode",
        ("network", "create", "a/b", "--mode", "bridge"): "invalid network name",
        ("network", "forward", "natx", "8080", "nosuch:80"): "domain 'nosuch' does not exist",
        ("network", "forward", "natx", "8080", "b1:80"): "b1 has no interface on network natx",
        ("network", "forward", "xenbr0", "8080", "nosuch:80"): "need a NAT network",
        ("network", "forward", "natx", "99999", "nosuch:80"): "bad host port",
        ("network", "forward", "nope", "8080", "x:80"): "network 'nope' does not exist",
        ("network", "unforward", "natx", "8080"): "has no forward of port 8080/tcp",
        ("network", "delete", "nope"): "network 'nope' does not exist",
    }
    for argv, message in cases.items():
        assert message in lab.fails(*argv, host="h1"), argv
    lab.gridvm("network", "delete", "natx", host="h1")
    lab.gridvm("delete", "b1", host="h1")
    after = (sorted(lab.links("h1")), nft_ruleset(lab, "h1"),
             lab.gridvm("network", "list", "--json", host="h1").stdout)
    assert after == before
    assert lab.pids("h1", "dnsmasq") == []
    assert not list(Path("/run/gridvm/net").glob("*/natx.*"))
