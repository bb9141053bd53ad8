"""Consistent snapshots and backups of a real Debian guest with its agent: filesystems are
frozen for the instant of the snapshot, and a file written after a disk snapshot is gone
once the domain has reverted to it (restarted on the snapshot's disk)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostlab import HostEnv

from gridvm.errors import GridvmError
from gridvm.images.store import ImageInfo

pytestmark = [pytest.mark.guest, pytest.mark.timeout(1200)]


def run(host: HostEnv, dom: str, script: str, timeout: float = 60) -> str:
    c = host.agent.client()
    try:
        res = c.post(f"/domains/{dom}/guest-exec", {"argv": ["/bin/sh", "-c", script],
                                                    "timeout": timeout}, timeout=timeout + 15)
    finally:
        c.close()
    assert res["returncode"] == 0, base64.b64decode(res["stderr"]).decode()
    return base64.b64decode(res["stdout"]).decode().strip()


def wait_agent(host: HostEnv, dom: str, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run(host, dom, "true", timeout=20)
            return
        except (GridvmError, AssertionError):
            pass
        time.sleep(2)
    raise AssertionError(f"{dom}: the guest agent did not answer within {timeout:.0f}s")


@pytest.fixture(scope="module")
def deb(host: HostEnv, debian_image: ImageInfo,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Debian guest (its own overlay of the test image) with qemu-guest-agent."""
    assert debian_image.disk is not None
    disk = tmp_path_factory.mktemp("deb") / "deb1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(debian_image.disk), str(disk)], check=True)
    cfg = disk.with_suffix(".cfg")
    cfg.write_text(f"""name = "deb1"
memory = 512
kernel = "{debian_image.kernel}"
ramdisk = "{debian_image.ramdisk}"
cmdline = "{debian_image.cmdline}"
disk = [ 'tap:qcow2:{disk},xvda,w' ]
""")
    host.gridvm("create", str(cfg))
    wait_agent(host, "deb1")
    yield "deb1"
    host.gridvm("destroy", "deb1", check=False)


def test_frozen_snapshot_revert_and_backup(host: HostEnv, deb: str, tmp_path: Path) -> None:
    before = run(host, deb, "head -c 1048576 /dev/urandom > /root/a.bin && sync && "
                            "md5sum /root/a.bin | cut -d' ' -f1")
    snap = json.loads(host.gridvm("snapshot", "create", deb, "pre", "--json").stdout)
    assert snap["consistency"] == "frozen" and 0 < snap["stall_ms"] < 30_000
    assert run(host, deb, "cat /proc/mounts | grep ' / '") and run(
        host, deb, "touch /root/thawed && echo ok") == "ok", "the guest was thawed"
    run(host, deb, "echo after > /root/b.txt && sync")

    backup = json.loads(host.gridvm("backup", deb, "--to", str(tmp_path / "store"), "--json",
                                    timeout=600).stdout)
    assert backup["consistency"] == "frozen" and backup["mode"] == "full"

    host.gridvm("snapshot", "revert", deb, "pre")
    wait_agent(host, deb)
    assert run(host, deb, "md5sum /root/a.bin | cut -d' ' -f1") == before
    assert run(host, deb, "test -e /root/b.txt && echo there || echo gone") == "gone"
