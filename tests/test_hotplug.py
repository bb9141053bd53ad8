"""Device hotplug with Xen's verbs on real (tiny) guests: disks, NICs and vCPUs come and go,
the guest sees them, and a save/restore and a gridvmd restart keep the current device set."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hostlab import HostEnv

from gridvm.api.client import DaemonNotRunning

pytestmark = pytest.mark.guest


def until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def image(path: Path, fmt: str = "qcow2", size: str = "64M", fill: int | None = None) -> str:
    """A disk image; with `fill`, its first MiB is that byte: returns that MiB's md5."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    if fill is None:
        return ""
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {fill} 0 1M", str(path)],
                   check=True, capture_output=True)
    return hashlib.md5(bytes([fill]) * (1 << 20)).hexdigest()


def disks(host: HostEnv, ip: str) -> dict[str, str]:
    """vdev (the serial gridvm gives a virtio disk) -> the guest's name for it."""
    return {d.split(":")[1]: d.split(":")[0] for d in host.http(ip, "/disks").split()}


def summed(host: HostEnv, ip: str, vdev: str) -> str:
    return host.http(ip, f"/sum?mb=1&dev={disks(host, ip)[vdev]}")


def nics(host: HostEnv, ip: str) -> dict[str, str]:
    return dict(n.split(":", 1) for n in host.http(ip, "/nics").split())


def test_disk_nic_and_vcpu_hotplug_survive_save_restore(host: HostEnv, tmp_path: Path) -> None:
    cfg, ip = host.write_cfg("hp1", extra="vcpus = 1\nmaxvcpus = 2")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    assert disks(host, ip) == {} and host.http(ip, "/cpus") == "0"

    # a disk appears in the guest with its data, and goes again
    data = tmp_path / "data.qcow2"
    md5 = image(data, fill=0x5A)
    host.gridvm("block-attach", "hp1", f"tap:qcow2:{data}", "xvdb")
    until(lambda: "xvdb" in disks(host, ip), "the guest to see xvdb")
    assert summed(host, ip, "xvdb") == md5
    listing = json.loads(host.gridvm("block-list", "hp1", "--json").stdout)
    assert [(d["vdev"], d["format"], d["target"]) for d in listing] == \
        [("xvdb", "qcow2", str(data))]
    host.gridvm("block-detach", "hp1", "xvdb")
    assert "xvdb" not in disks(host, ip)
    subprocess.run(["qemu-img", "check", "-q", str(data)], check=True)   # no QEMU holds it

    # a NIC appears with its MAC; its tap is on the bridge
    host.gridvm("network-attach", "hp1", "bridge=xenbr0", "mac=00:16:3e:0a:0b:0c")
    until(lambda: "00:16:3e:0a:0b:0c" in nics(host, ip).values(), "the guest to see the NIC")
    vifs = json.loads(host.gridvm("network-list", "hp1", "--json").stdout)
    assert [v["mac"] for v in vifs][1:] == ["00:16:3e:0a:0b:0c"] and vifs[1]["tap"] in host.taps()

    # vCPUs come online and go
    host.gridvm("vcpu-set", "hp1", "2")
    until(lambda: host.http(ip, "/cpus") == "0-1", "the second vCPU to come online")
    bad = host.gridvm("vcpu-set", "hp1", "3", check=False)
    assert bad.returncode == 1 and "not within 1..2" in bad.stderr

    # attach again, then save and restore: the same boot continues with the same devices
    host.gridvm("block-attach", "hp1", f"tap:qcow2:{data}", "xvdc", "r")
    until(lambda: "xvdc" in disks(host, ip), "the guest to see xvdc")
    boot = host.http(ip, "/bootid")
    save = tmp_path / "hp1.save"
    host.gridvm("save", "hp1", str(save))
    host.gridvm("restore", str(save))
    host.wait_http(ip, "/health", timeout=60)
    assert host.http(ip, "/bootid") == boot
    assert list(disks(host, ip)) == ["xvdc"] and summed(host, ip, "xvdc") == md5
    assert "00:16:3e:0a:0b:0c" in nics(host, ip).values()
    assert host.http(ip, "/cpus") == "0-1"

    # a gridvmd restart re-adopts the hot-plugged tap (it is not on QEMU's command line)
    tap = json.loads(host.gridvm("network-list", "hp1", "--json").stdout)[1]["tap"]
    host.agent.stop()
    host.agent.start()
    assert json.loads(host.gridvm("network-list", "hp1", "--json").stdout)[1]["tap"] == tap
    assert tap in host.taps()
    host.gridvm("network-detach", "hp1", "1")
    until(lambda: "00:16:3e:0a:0b:0c" not in nics(host, ip).values(), "the NIC to go")
    assert tap not in host.taps()
    host.gridvm("vcpu-set", "hp1", "1")
    until(lambda: host.http(ip, "/cpus") == "0", "the second vCPU to go")
    # QEMU 7 under TCG crashes on a vCPU plugged in after an unplug: refused, guest unharmed
    again = host.gridvm("vcpu-set", "hp1", "2", check=False)
    assert again.returncode == 1 and "restart the domain" in again.stderr
    assert host.http(ip, "/cpus") == "0" and host.http(ip, "/bootid") == boot
    host.gridvm("destroy", "hp1")
    host.assert_clean()


def test_managed_domain_starts_with_attached_devices(host: HostEnv, tmp_path: Path) -> None:
    cfg, ip = host.write_cfg("hp2", extra="vcpus = 1\nmaxvcpus = 2")
    host.gridvm("new", str(cfg))
    data = tmp_path / "d.raw"
    md5 = image(data, "raw", fill=0x33)
    host.gridvm("block-attach", "hp2", f"file:{data}", "xvdb")     # stopped: definition only
    host.gridvm("vcpu-set", "hp2", "2")
    assert json.loads(host.gridvm("list", "hp2", "--json").stdout)[0]["vcpus"] == 2
    host.gridvm("vcpu-set", "hp2", "1")    # (two vCPUs boot slowly under TCG)
    host.gridvm("start", "hp2")
    host.wait_http(ip)
    assert list(disks(host, ip)) == ["xvdb"] and summed(host, ip, "xvdb") == md5
    host.gridvm("network-attach", "hp2", "bridge=xenbr0")
    mac = json.loads(host.gridvm("network-list", "hp2", "--json").stdout)[1]["mac"]
    host.gridvm("destroy", "hp2")
    host.gridvm("start", "hp2")
    host.wait_http(ip)
    assert mac in nics(host, ip).values(), "the attached NIC is kept for the next start"
    assert list(disks(host, ip)) == ["xvdb"]
    host.gridvm("destroy", "hp2")
    host.gridvm("delete", "hp2")
    host.assert_clean()


def test_hotplug_refusals_change_nothing(host: HostEnv, tmp_path: Path) -> None:
    root = tmp_path / "root.raw"
    image(root, "raw")
    cfg, ip = host.write_cfg("hp3", extra=f"disk = ['file:{root},xvda,w']\n"
                                          "root = '/dev/xvda ro'")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    before = host.gridvm("block-list", "hp3", "--json").stdout

    def refused(*args: str, says: str) -> None:
        proc = host.gridvm(*args, check=False)
        assert proc.returncode == 1, args
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    refused("block-detach", "hp3", "xvda", says="xvda is the root disk of hp3")
    refused("block-detach", "hp3", "xvdq", says="has no disk 'xvdq'")
    refused("block-attach", "hp3", f"file:{tmp_path}/missing.img", "xvdb",
            says="does not exist")
    refused("block-attach", "hp3", f"file:{root}", "xvd!", says="bad virtual device")
    refused("block-attach", "hp3", f"file:{root}", "xvda", says="xvda used twice")
    refused("block-attach", "hp3", f"file:{root}", "xvdb", "x", says="bad access mode")
    refused("network-attach", "hp3", "mac=01:00:00:00:00:01", says="multicast")
    refused("network-attach", "hp3", "model=e1000", "bridge", says="expected key=value")
    refused("network-detach", "hp3", "5", says="no vif 5")
    refused("vcpu-set", "hp3", "2", says="set maxvcpus")
    assert host.gridvm("block-list", "hp3", "--json").stdout == before
    assert len(json.loads(host.gridvm("network-list", "hp3", "--json").stdout)) == 1

    # the API refuses what the file reader refuses (one model validates both)
    c = host.agent.client()
    try:
        for disk, says in (({"target": "rel.img", "vdev": "xvdb"}, "absolute path"),
                           ({"target": str(root), "vdev": "xvdb", "format": "vmdk"}, "format"),
                           ({"target": str(root), "vdev": "xvdb", "slot": 40}, "slot"),
                           ({"target": str(root) + "\n", "vdev": "xvdb"}, "newline")):
            with pytest.raises(Exception) as exc:
                c.post("/domains/hp3/block", {"disk": disk})
            assert says in str(exc.value) and not isinstance(exc.value, DaemonNotRunning)
        with pytest.raises(Exception, match="unknown NIC model"):
            c.post("/domains/hp3/network", {"vif": {"model": "e1000,id=x"}})
    finally:
        c.close()
    assert host.gridvm("block-list", "hp3", "--json").stdout == before
    host.gridvm("destroy", "hp3")
    host.assert_clean()
