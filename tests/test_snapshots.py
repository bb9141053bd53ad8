"""Snapshots of real (tiny) guests: disk snapshots revert the disk (a domain that runs restarts
on it), memory snapshots resume the guest where it was, a tree of parents and children, raw
disks refused or converted, and refusals that change nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hostlab import HostEnv

pytestmark = pytest.mark.guest


def snaps(host: HostEnv, dom: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(host.gridvm("snapshot", "list", dom, "--json").stdout)
    return data


def domain_with_disk(host: HostEnv, tmp: Path, name: str, fmt: str = "qcow2",
                     managed: bool = False) -> tuple[str, Path]:
    disk = tmp / f"{name}.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(disk), "64M"], check=True)
    kind = "tap:qcow2:" if fmt == "qcow2" else "file:"
    cfg, ip = host.write_cfg(name, extra=f"disk = ['{kind}{disk},xvda,w']")
    host.gridvm("new" if managed else "create", str(cfg))
    if managed:
        host.gridvm("start", name)
    host.wait_http(ip)
    return ip, disk


def fill(host: HostEnv, ip: str) -> str:
    host.http(ip, "/fill?mb=2", timeout=30)
    return host.http(ip, "/sum?mb=2", timeout=30)


def test_disk_snapshots_revert_and_form_a_tree(host: HostEnv, tmp_path: Path) -> None:
    ip, _ = domain_with_disk(host, tmp_path, "sn1")
    first = fill(host, ip)
    made = json.loads(host.gridvm("snapshot", "create", "sn1", "s1", "--json").stdout)
    assert made["consistency"] == "crash" and made["disks"] == ["xvda"]   # no guest agent
    second = fill(host, ip)
    assert second != first
    boot = host.http(ip, "/bootid")

    out = host.gridvm("snapshot", "revert", "sn1", "s1").stdout
    assert "restarted on the snapshot's disks" in out
    host.wait_new_boot(ip, boot)
    assert host.http(ip, "/sum?mb=2", timeout=30) == first, "data written after s1 is gone"

    # s1 -> s2, then back to s1 and s3 beside s2: a branch
    fill(host, ip)
    host.gridvm("snapshot", "create", "sn1", "s2")
    boot = host.http(ip, "/bootid")
    host.gridvm("snapshot", "revert", "sn1", "s1")
    host.wait_new_boot(ip, boot)
    host.gridvm("snapshot", "create", "sn1", "s3")
    tree = {s["name"]: s for s in snaps(host, "sn1")["snapshots"]}
    assert tree["s1"]["children"] == ["s2", "s3"] and tree["s3"]["current"]
    listing = host.gridvm("snapshot", "list", "sn1").stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["s1", "├─", "└─"]
    assert "s3 *" in listing[2]

    # refusals change nothing
    boot = host.http(ip, "/bootid")
    for args, says in ((("revert", "sn1", "nope"), "has no snapshot 'nope'"),
                       (("delete", "sn1", "nope"), "has no snapshot 'nope'"),
                       (("create", "sn1", "s2"), "already exists"),
                       (("create", "sn1", "bad/name"), "invalid snapshot name")):
        proc = host.gridvm("snapshot", *args, check=False)
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
    assert host.http(ip, "/bootid") == boot
    assert [s["name"] for s in snaps(host, "sn1")["snapshots"]] == ["s1", "s2", "s3"]

    host.gridvm("snapshot", "delete", "sn1", "s1")     # its children move up
    tree = {s["name"]: s for s in snaps(host, "sn1")["snapshots"]}
    assert set(tree) == {"s2", "s3"} and tree["s2"]["parent"] is None
    host.gridvm("destroy", "sn1")
    host.assert_clean()


def test_memory_snapshot_resumes_the_guest_where_it_was(host: HostEnv, tmp_path: Path) -> None:
    ip, disk = domain_with_disk(host, tmp_path, "sn2", managed=True)
    host.http(ip, "/mark?set=before")
    data = fill(host, ip)
    boot = host.http(ip, "/bootid")
    made = json.loads(host.gridvm("snapshot", "create", "sn2", "m1", "--memory",
                                  "--json").stdout)
    assert made["memory"] and made["consistency"] == "memory" and made["state"] == "running"
    host.http(ip, "/mark?set=after")
    assert fill(host, ip) != data

    out = host.gridvm("snapshot", "revert", "sn2", "m1").stdout
    assert "resumed where it was" in out
    assert host.http(ip, "/mark") == "before" and host.http(ip, "/bootid") == boot
    assert host.http(ip, "/sum?mb=2", timeout=30) == data

    # from a stopped domain: a fresh QEMU is loaded with the snapshot's state
    host.gridvm("destroy", "sn2")
    out = host.gridvm("snapshot", "revert", "sn2", "m1").stdout
    assert "restarted where it was" in out
    host.wait_http(ip, "/health", timeout=30)
    assert host.http(ip, "/mark") == "before" and host.http(ip, "/bootid") == boot

    # a stopped domain's disk snapshot is taken with qemu-img; reverting keeps it stopped
    host.gridvm("destroy", "sn2")
    host.gridvm("snapshot", "create", "sn2", "off1")
    assert snaps(host, "sn2")["snapshots"][-1]["consistency"] == "offline"
    subprocess.run(["qemu-io", "-c", "write -P 0x77 0 2M", str(disk)], check=True,
                   capture_output=True)
    out = host.gridvm("snapshot", "revert", "sn2", "off1").stdout
    assert "stays shut off" in out
    host.gridvm("start", "sn2")
    host.wait_http(ip)
    assert host.http(ip, "/sum?mb=2", timeout=30) == data
    host.gridvm("destroy", "sn2")
    host.gridvm("delete", "sn2")
    host.assert_clean()


def test_raw_disks_are_refused_or_converted_live(host: HostEnv, tmp_path: Path) -> None:
    ip, disk = domain_with_disk(host, tmp_path, "sn3", fmt="raw")
    data = fill(host, ip)
    proc = host.gridvm("snapshot", "create", "sn3", "r1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"gridvm: error: disk xvda ({disk}) is raw; snapshots "
                                   "need qcow2: run again with --convert to convert it (the "
                                   "raw file is kept)")
    assert snaps(host, "sn3")["snapshots"] == []
    mem = host.gridvm("snapshot", "create", "sn3", "r1", "--memory", check=False)
    assert mem.returncode == 1 and "is raw" in mem.stderr
    boot = host.http(ip, "/bootid")
    host.gridvm("snapshot", "create", "sn3", "r1", "--convert")
    assert host.http(ip, "/bootid") == boot and host.http(ip, "/sum?mb=2", timeout=30) == data
    target = json.loads(host.gridvm("block-list", "sn3", "--json").stdout)[0]
    assert (target["target"], target["format"]) == (str(tmp_path / "sn3.qcow2"), "qcow2")
    assert disk.exists(), "the raw original is kept"
    fill(host, ip)
    host.gridvm("snapshot", "revert", "sn3", "r1")
    host.wait_new_boot(ip, boot)
    assert host.http(ip, "/sum?mb=2", timeout=30) == data
    host.gridvm("destroy", "sn3")
    host.assert_clean()
