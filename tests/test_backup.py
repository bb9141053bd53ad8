"""Backups of real (tiny) guests into a deduplicating store: incrementals read only what the
dirty bitmap marks (and stay incremental across a gridvmd restart, a guest reboot, and a
clean restart on another host), a second full backup adds almost nothing, a restore boots
with the data; a crash makes the bitmap untrusted (full, and said); a full or read-only
store is a clear error that loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostlab import HostEnv, host_env

from gridvm.api.client import Client
from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest
MIB = 1 << 20


@contextlib.contextmanager
def api(host: HostEnv) -> Iterator[Client]:
    c = host.agent.client()
    try:
        yield c
    finally:
        c.close()


def backup(host: HostEnv, dom: str, store: Path, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(host.gridvm("backup", dom, "--to", str(store), *args,
                                                 "--json", timeout=600).stdout)
    return out


def disk(out: dict[str, Any], vdev: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in out["disks"] if d["vdev"] == vdev)
    return found


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, ro: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "gvtest", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_incremental_backups_dedup_and_a_restore_that_boots(host: HostEnv,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "bk1-data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "1G"], check=True)
    cfg, ip = host.write_cfg("bk1", hvm=True, extra=f"disk = ['tap:qcow2:{host.hvm_disk('bk1')},"
                                                    f"hda,w', 'tap:qcow2:{data},hdb,w']")
    host.gridvm("create", str(cfg))
    host.wait_http(ip, timeout=120)
    store = tmp_path / "store"

    first = backup(host, "bk1", store)
    assert first["mode"] == "full" and disk(first, "hdb")["read"] == 0, "a new disk reads as holes"
    assert "first backup" in disk(first, "hda")["reason"]
    host.http(ip, "/fill?mb=8", timeout=60)
    checksum = host.http(ip, "/sum?mb=8", timeout=60)

    second = backup(host, "bk1", store)
    assert second["mode"] == "incremental", second
    assert 8 * MIB <= disk(second, "hdb")["read"] <= 12 * MIB, "about 8 MiB, not 1 GiB"
    assert disk(second, "hda")["read"] < 4 * MIB
    assert 8 * MIB <= second["stored"] < 9 * MIB     # random data does not compress

    again = backup(host, "bk1", store, "--full")
    assert again["mode"] == "full" and disk(again, "hdb")["read"] >= 8 * MIB
    assert again["stored"] < 64 * 1024, "a second full backup adds almost nothing"

    host.agent.stop()           # a gridvmd restart keeps the bitmaps (they live in QEMU)
    host.agent.start()
    host.http(ip, "/fill?mb=1", timeout=60)
    third = backup(host, "bk1", store)
    assert third["mode"] == "incremental" and disk(third, "hdb")["read"] == 4 * MIB

    boot = host.http(ip, "/bootid")
    host.gridvm("reboot", "-w", "bk1", "--timeout", "120")
    host.wait_new_boot(ip, boot, timeout=120)
    host.http(ip, "/fill?mb=8", timeout=60)
    checksum = host.http(ip, "/sum?mb=8", timeout=60)
    fourth = backup(host, "bk1", store)
    assert fourth["mode"] == "incremental" and disk(fourth, "hdb")["read"] <= 12 * MIB

    listing = json.loads(host.gridvm("backup", "list", str(store), "--json").stdout)
    assert [b["id"] for b in listing["backups"]] == [first["id"], second["id"], again["id"],
                                                     third["id"], fourth["id"]]
    assert listing["dedup_ratio"] > 50
    verify = host.gridvm("backup", "verify", str(store)).stdout
    assert verify.count(" ok") == 5

    # restore the latest as a new domain: it boots from the restored disk with the data
    host.gridvm("destroy", "bk1")
    restored = json.loads(host.gridvm("backup", "restore", str(store), fourth["id"], "bk1r",
                                      "--start", "--json", timeout=600).stdout)
    assert restored["from"] == "bk1" and set(restored["disks"]) == {"hda", "hdb"}
    host.wait_http(ip, timeout=120)
    assert host.http(ip) == "bk1" and host.http(ip, "/sum?mb=8", timeout=60) == checksum
    view = json.loads(host.gridvm("list", "bk1r", "--json").stdout)[0]
    assert view["managed"] and all(Path(d["target"]).parent == host.home / "disks"
                                   for d in view["disks"])
    host.gridvm("destroy", "bk1r")

    pruned = json.loads(host.gridvm("backup", "prune", str(store), "--keep-last", "2",
                                    "--json").stdout)
    assert pruned["removed"] == [first["id"], second["id"], again["id"]]
    assert host.gridvm("backup", "verify", str(store)).stdout.count(" ok") == 2
    host.gridvm("delete", "--purge", "bk1r")
    host.assert_clean()


def test_bitmaps_survive_a_clean_restart_elsewhere_but_not_a_crash(
        host: HostEnv, tiny_image: ImageInfo, test_images_dir: Path,
        tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    data = shared / "bk2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "256M"], check=True)
    store = shared / "store"
    extra = (f"disk = ['tap:qcow2:{data},xvda,w']\non_crash = 'destroy'\n"
             "uuid = '6a0f6bd4-54a1-4a4f-9d6e-2c0d8f2a7b11'")     # HA keeps the UUID
    cfg, ip = host.write_cfg("bk2", extra=extra)
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    host.http(ip, "/fill?mb=4", timeout=60)
    assert backup(host, "bk2", store)["mode"] == "full"
    host.http(ip, "/fill?mb=4", timeout=60)
    host.gridvm("destroy", "bk2")         # QEMU quits: the bitmap is written to the image

    with host_env(tiny_image, tmp_path / "other", test_images_dir) as other:
        cfg2, ip2 = other.write_cfg("bk2", extra=extra)
        other.gridvm("create", str(cfg2))
        other.wait_http(ip2)
        moved = backup(other, "bk2", store)
        assert moved["mode"] == "incremental", disk(moved, "xvda")["reason"]
        assert disk(moved, "xvda")["read"] == 4 * MIB
        boot = other.http(ip2, "/bootid")         # a guest reboot keeps the bitmap
        other.gridvm("reboot", "-w", "bk2", "--timeout", "60")
        other.wait_new_boot(ip2, boot)
        other.http(ip2, "/fill?mb=1", timeout=60)
        rebooted = backup(other, "bk2", store)
        assert rebooted["mode"] == "incremental" and disk(rebooted, "xvda")["read"] == 4 * MIB
        other.gridvm("destroy", "bk2")

    host.gridvm("create", str(cfg))       # back on the first host, where it crashes
    host.wait_http(ip)
    host.http(ip, "/fill?mb=1", timeout=60)
    pid = json.loads(host.gridvm("list", "bk2", "--json").stdout)[0]["pid"]
    os.kill(pid, 9)                       # the bitmap in the image stays marked in use
    deadline = time.monotonic() + 30
    while [d for d in host.domains() if d["name"] == "bk2"]:
        assert time.monotonic() < deadline, "gridvmd did not notice QEMU's death"
        time.sleep(0.1)
    host.gridvm("create", str(cfg))       # restarted (as HA would)
    host.wait_http(ip)
    after = backup(host, "bk2", store)
    assert after["mode"] == "full"
    assert "cannot be trusted" in disk(after, "xvda")["reason"]
    again = backup(host, "bk2", store)
    assert again["mode"] == "incremental" and disk(again, "xvda")["read"] == 0
    host.gridvm("destroy", "bk2")
    host.assert_clean()


def test_full_or_readonly_store_fails_cleanly_and_loses_nothing(host: HostEnv,
                                                               tmp_path: Path) -> None:
    data = tmp_path / "bk3.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M"], check=True)
    cfg, ip = host.write_cfg("bk3", extra=f"disk = ['tap:qcow2:{data},xvda,w']")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    host.http(ip, "/fill?mb=6", timeout=60)

    with tmpfs(tmp_path / "small", "12M") as small:
        store = small / "store"
        first = backup(host, "bk3", store)
        before = files(store)
        host.http(ip, "/fill?mb=16", timeout=60)
        proc = host.gridvm("backup", "bk3", "--to", str(store), check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"gridvm: error: backup store {store} is full (no space " \
                                      "left on device)"
        assert files(store) == before, "the failed backup left nothing behind"
        listing = json.loads(host.gridvm("backup", "list", str(store), "--json").stdout)
        assert [b["id"] for b in listing["backups"]] == [first["id"]]
        subprocess.run(["mount", "-o", "remount,size=48M", str(small)], check=True)
        retry = backup(host, "bk3", store)
        assert retry["mode"] == "incremental" and disk(retry, "xvda")["read"] >= 16 * MIB, \
            "the changes the failed backup saw are still in the next incremental"

    with tmpfs(tmp_path / "ro", "1M", ro=True) as ro:
        proc = host.gridvm("backup", "bk3", "--to", str(ro / "store"), check=False)
        assert proc.returncode == 1 and "Read-only file system" in proc.stderr
    busy = tmp_path / "notastore"
    busy.mkdir()
    (busy / "file").write_text("x")
    proc = host.gridvm("backup", "bk3", "--to", str(busy), check=False)
    assert proc.returncode == 1 and "not empty and not a backup store" in proc.stderr
    proc = host.gridvm("backup", "restore", str(tmp_path / "small"), "nope", "x", check=False)
    assert proc.returncode == 1 and "not a gridvm backup store" in proc.stderr
    assert host.http(ip, "/health") == "ok"
    host.gridvm("destroy", "bk3")
    host.assert_clean()
