"""Confined QEMU: each domain's QEMU runs as its own unprivileged uid under seccomp, and can
open only what gridvmd handed it (its run dir, its disks), never another domain's disk or a
host file by path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hostlab import HostEnv

from gridvm.host import confine

pytestmark = pytest.mark.guest


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def rundir_of(host: HostEnv, name: str) -> Path:
    view = next(d for d in host.domains() if d["name"] == name)
    return host.home / "run" / str(view["domid"])


class Qmp:
    """A bare QMP client on a domain's socket (while gridvmd is stopped)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())
        assert "return" in self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.f.write(json.dumps({"execute": name, "arguments": args or {}}) + "\n")
        self.f.flush()
        while True:
            reply: dict[str, Any] = json.loads(self.f.readline())
            if "event" not in reply:
                return reply

    def open_raw(self, node: str, path: str | Path) -> dict[str, Any]:
        return self.cmd("blockdev-add", {"driver": "raw", "node-name": node, "read-only": True,
                                         "file": {"driver": "file", "filename": str(path)}})

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def test_qemu_runs_as_its_own_uid_under_seccomp(host: HostEnv, tmp_path: Path) -> None:
    disk_a, disk_b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for disk in (disk_a, disk_b):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
                       check=True)
    modes = {d: (d.stat().st_uid, d.stat().st_mode) for d in (disk_a, disk_b)}
    cfg_a, _ = host.write_cfg("ca", extra=f"disk = ['tap:qcow2:{disk_a},xvdb,w']")
    cfg_b, _ = host.write_cfg("cb", extra=f"disk = ['tap:qcow2:{disk_b},xvdb,w']")
    host.gridvm("create", str(cfg_a))
    host.gridvm("create", str(cfg_b))
    try:
        pids = host.qemu_pids()
        assert len(pids) == 2
        uids = set()
        for pid in pids:
            st = status(pid)
            uid = int(st["Uid"].split()[0])
            assert st["Uid"].split() == [str(uid)] * 4, st["Uid"]
            assert st["Gid"].split() == [str(uid)] * 4, st["Gid"]
            assert uid in confine.uid_range()
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
            uids.add(uid)
        assert len(uids) == 2, "two domains share a uid"
        run_a, run_b = rundir_of(host, "ca"), rundir_of(host, "cb")
        for run in (run_a, run_b):
            st_run = run.stat()
            assert st_run.st_uid in uids and st_run.st_mode & 0o777 == 0o700
        assert run_a.stat().st_uid != run_b.stat().st_uid
        # Disks are handed over as descriptors: their owner and mode never change.
        assert {d: (d.stat().st_uid, d.stat().st_mode) for d in modes} == modes

        # With gridvmd away, speak to ca's QEMU directly: it may open nothing by path.
        host.agent.stop()
        qmp = Qmp(run_a / "qmp.sock")
        try:
            denied = [qmp.open_raw("x1", disk_b), qmp.open_raw("x2", "/etc/shadow"),
                      qmp.open_raw("x3", disk_a)]
            for reply in denied:
                assert "Permission denied" in reply.get("error", {}).get("desc", ""), reply
            # ... but what it was given works: its own disk, through the fd set.
            blocks = qmp.cmd("query-block")["return"]
            files = [b["inserted"]["file"] for b in blocks if "inserted" in b]
            assert any(f.startswith("/dev/fdset/") for f in files), files
            sets = qmp.cmd("query-fdsets")["return"]
            own = next(s["fdset-id"] for s in sets
                       if any(f.get("opaque") == str(disk_a) for f in s["fds"]))
            reply = qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "x4",
                                             "read-only": True, "file": {
                                                 "driver": "file",
                                                 "filename": f"/dev/fdset/{own}"}})
            assert reply.get("return") == {}, reply
            assert qmp.cmd("blockdev-del", {"node-name": "x4"}).get("return") == {}
        finally:
            qmp.close()
        host.agent.start()
        assert {d["name"] for d in host.domains()} == {"ca", "cb"}   # re-adopted
    finally:
        for name in ("ca", "cb"):
            host.gridvm("destroy", name, check=False)
    host.assert_clean()
    assert {d: (d.stat().st_uid, d.stat().st_mode) for d in modes} == modes
    claims = {p.name for p in confine.CLAIMS.iterdir()} if confine.CLAIMS.exists() else set()
    assert not claims & {str(u) for u in uids}, "uid claims left behind"
    assert os.geteuid() == 0


def test_standalone_argv_gives_paths_back(tmp_path: Path) -> None:
    """The benchmarks replay a confined QEMU's command by hand: descriptors become paths."""
    from gridvm.config.model import DomainConfig
    from gridvm.qemu.argv import build_argv
    from gridvm.qemu.confine import Confined, DiskFds, standalone_argv

    cfg = DomainConfig.model_validate({
        "name": "sa", "kernel": "/k,1", "memory": 64,
        "disks": [{"target": "/d/a.qcow2", "vdev": "xvda", "format": "qcow2"}]})
    c = Confined(tmp_path / "run", 17)
    top = c.add(20, "/d/a.qcow2")
    c.add(21, "/d/a.qcow2", top)
    base = c.add(22, "/d/base.img")
    c.inherit[23] = "/k,1"
    c.kernel = "/proc/self/fd/23"
    c.disks["xvda"] = DiskFds(top, [(base, "raw")])
    argv = build_argv("qemu", cfg, accel="tcg", rundir=tmp_path / "run", taps=[], confined=c)
    assert "-sandbox" in argv and "/proc/self/fd/23" in argv
    plain = standalone_argv(argv)
    text = " ".join(plain)
    assert "fdset" not in text and "/proc/self" not in text and "-add-fd" not in plain
    assert "-sandbox" not in plain and "gridvm-rundir" not in text
    assert plain[plain.index("-kernel") + 1] == "/k,1"
    assert f"unix:{tmp_path}/run/qmp.sock,server=on" in text
    assert "file=/d/a.qcow2,file.locking=off" in text
    assert "backing.file.filename=/d/base.img" in text
