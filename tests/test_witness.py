"""FermiGrid's shape: two hosts and a witness. etcd members on fermigrid5 (h1), fermigrid6
(h2) and a small witness box (h3, running no guests); each machine set up by its own
administrator with `cluster init`, `cluster witness` and `cluster join --etcd-member`.

Losing the witness changes nothing; losing a host, the other host and the witness hold
quorum and the HA domain comes back on the survivor; a host left alone (the witness gone
too) cannot tell a dead peer from a cut link, so it refuses to act: it fences its own HA
domains, and they come back only once quorum does."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import LabEnv, lab_env, wait_for

from gridvm.cluster.etcd import Etcd
from gridvm.cluster.pki import Identity
from gridvm.host import netns
from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("witlab"), 3) as env:
        yield env


def gridvm_on(lab: LabEnv, host: str, *args: str, check: bool = True) -> str:
    proc = lab.gridvm("lab", "exec", host, "--name", lab.name, "--", sys.executable, "-m",
                      "gridvm", *args, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{host}: gridvm {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout if check else proc.stderr


def members(lab: LabEnv) -> list[str]:
    ident = Identity(Path(lab.state.host("h2").home) / "pki")

    def names() -> list[str]:
        etcd = Etcd(f"https://{lab.addr('h2')}:2379", timeout=3, tls=ident.client_context())
        try:
            return sorted(str(m.get("name")) for m in etcd.members())
        finally:
            etcd.close()
    result: list[str] = netns.call_in(lab.ns("h2"), names)
    return result


def healthy(lab: LabEnv, address: str) -> bool:
    """Does the etcd member at `address` answer (as a member that has caught up)?"""
    ident = Identity(Path(lab.state.host("h2").home) / "pki")

    def status() -> bool:
        etcd = Etcd(f"https://{address}:2379", timeout=2, tls=ident.client_context())
        try:
            return bool(etcd.call("maintenance/status", {}).get("leader"))
        finally:
            etcd.close()
    result: bool = netns.call_in(lab.ns("h2"), status)
    return result


def where(lab: LabEnv, name: str) -> str | None:
    out = json.loads(gridvm_on(lab, "h2", "list", "--json"))
    found = [v for v in out if v["name"] == name and v["state"] in ("running", "blocked")]
    return found[0].get("host") if found else None


def test_two_hosts_and_a_witness(lab: LabEnv) -> None:
    a1, a3 = lab.addr("h1"), lab.addr("h3")
    init = json.loads(gridvm_on(lab, "h1", "cluster", "init", "--cluster-name", "fermigrid",
                                "--name", "h1", "--ttl", "3", "--json"))
    wit = json.loads(gridvm_on(lab, "h1", "cluster", "token", "--witness", "--json"))
    out = gridvm_on(lab, "h3", "cluster", "witness", a1, "--token", wit["token"],
                    "--ca-hash", wit["ca_hash"], "--listen", a3,
                    "--dir", str(Path(lab.state.host("h3").home) / "witness"),
                    "--name", "witness")
    assert f"etcd member at https://{a3}:2379" in out
    tok = json.loads(gridvm_on(lab, "h1", "cluster", "token", "--json"))
    gridvm_on(lab, "h2", "cluster", "join", a1, "--token", tok["token"], "--ca-hash",
              init["ca_hash"], "--name", "h2", "--ttl", "3", "--etcd-member")
    assert members(lab) == ["h1", "h2", "witness"]
    hosts = {h["name"]: h["state"] for h in json.loads(gridvm_on(lab, "h1", "host", "list",
                                                                 "--json"))}
    assert hosts == {"h1": "up", "h2": "up"}              # the witness is not a host

    cfg = lab.shared / "fg1.cfg"
    cfg.write_text(lab.write_cfg("fg1", "bridge=xenbr0", f'ip = "{lab.guest_ip(60)}"\n'
                                 'netmask = "255.255.255.0"\nha = "restart"').read_text())
    gridvm_on(lab, "h2", "create", str(cfg), "--host", "h1")
    assert lab.wait_http(lab.guest_ip(60)) == "fg1"

    # The witness is lost: two of three members remain, nothing changes.
    lab.gridvm("lab", "poweroff", "h3", "--name", lab.name)
    cfg2 = lab.shared / "fg2.cfg"
    cfg2.write_text(lab.write_cfg("fg2", "bridge=xenbr0", "").read_text())
    gridvm_on(lab, "h1", "create", str(cfg2), "--host", "h2")
    gridvm_on(lab, "h1", "destroy", "fg2")
    assert where(lab, "fg1") == "h1"
    lab.gridvm("lab", "poweron", "h3", "--name", lab.name)
    gridvm_on(lab, "h3", "cluster", "witness", a1, "--token", wit["token"], "--ca-hash",
              wit["ca_hash"], "--listen", a3, "--dir",
              str(Path(lab.state.host("h3").home) / "witness"))    # after a reboot: start it
    wait_for("the witness back", lambda: healthy(lab, a3), 30)

    # h1 is lost: h2 and the witness hold quorum; fg1 comes back on h2.
    lab.gridvm("lab", "poweroff", "h1", "--name", lab.name)
    try:
        wait_for("fg1 on h2", lambda: where(lab, "fg1") == "h2", 60)
    except AssertionError:
        print(gridvm_on(lab, "h2", "host", "list", check=False),
              gridvm_on(lab, "h2", "list", check=False),
              gridvm_on(lab, "h2", "cluster", "status", check=False))
        raise
    assert lab.wait_http(lab.guest_ip(60)) == "fg1"

    # The witness is lost too: h2 alone cannot know whether it is the one cut off. It
    # refuses to pretend: no quorum, its watchdog fences its HA domain.
    lab.gridvm("lab", "poweroff", "h3", "--name", lab.name)
    wait_for("h2 to fence itself", lambda: not lab.pids("h2", "fg1"), 30)
    err = gridvm_on(lab, "h2", "host", "list", check=False)
    assert "etcd" in err

    # Quorum comes back with the witness: fg1 runs again (on h2; h1 is still off).
    lab.gridvm("lab", "poweron", "h3", "--name", lab.name)
    gridvm_on(lab, "h3", "cluster", "witness", a1, "--token", wit["token"], "--ca-hash",
              wit["ca_hash"], "--listen", a3, "--dir",
              str(Path(lab.state.host("h3").home) / "witness"))
    try:
        wait_for("fg1 back on h2", lambda: where(lab, "fg1") == "h2", 180)
    except AssertionError:
        for pid in lab.pids("h2", "gridvmd") + lab.pids("h2", "gridvm.cluster.watchdog"):
            os.kill(pid, signal.SIGUSR1)          # their threads' stacks, into their logs
        time.sleep(1)
        print(gridvm_on(lab, "h2", "host", "list", check=False),
              gridvm_on(lab, "h2", "list", check=False),
              gridvm_on(lab, "h2", "cluster", "status", check=False),
              Path(lab.state.host("h2").home, "logs", "gridvmd.log").read_text()[-20000:],
              Path(lab.state.host("h2").home, "cluster", "watchdog.log").read_text()[-8000:])
        raise
    assert lab.wait_http(lab.guest_ip(60)) == "fg1"
