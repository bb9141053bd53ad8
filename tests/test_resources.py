"""Resource control on real guests: credit-scheduler cap and weight, pinning, balloon,
block and network throttles, persistence across a daemon restart, and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostlab import HostEnv

from gridvm.host import procs
from gridvm.host.resources import cgroup_parent

pytestmark = pytest.mark.guest


def view(host: HostEnv, name: str) -> dict:
    return json.loads(host.gridvm("list", name, "--json").stdout)[0]


def cpu_share(pids: list[int], seconds: float = 3.0) -> list[float]:
    """CPU used by each process over `seconds`, in % of one host CPU."""
    before = [procs.cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    after = [procs.cpu_seconds(p) for p in pids]
    return [100 * (a - b) / seconds for a, b in zip(after, before, strict=True)]


def boot(host: HostEnv, name: str, extra: str = "", memory: int = 128) -> tuple[str, dict]:
    cfg, ip = host.write_cfg(name, extra=extra, memory=memory)
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    return ip, view(host, name)


def test_cap_is_a_hard_ceiling_and_changes_live(host: HostEnv) -> None:
    ip, v = boot(host, "cap1", extra="cpu_cap = 30")
    host.http(ip, "/burn?seconds=30")
    time.sleep(1)
    (share,) = cpu_share([v["pid"]])
    assert share < 40, f"cap 30 exceeded: {share:.0f}%"
    host.gridvm("sched-credit", "-d", "cap1", "-c", "60")
    time.sleep(1)
    (share60,) = cpu_share([v["pid"]])
    print(f"\nburning guest: cap 30 -> {share:.1f}%, cap 60 -> {share60:.1f}% of one CPU")
    assert share < share60 < 70, f"cap 60 gave {share60:.0f}% (cap 30 gave {share:.0f}%)"
    rows = json.loads(host.gridvm("sched-credit", "-d", "cap1", "--json").stdout)
    assert rows == [{"name": "cap1", "domid": v["domid"], "weight": 256, "cap": 60}]
    host.gridvm("destroy", "cap1")


def test_double_weight_gets_more_cpu_on_a_shared_cpu(host: HostEnv) -> None:
    ip1, v1 = boot(host, "heavy", extra='cpus = "0"\ncpu_weight = 512')
    ip2, v2 = boot(host, "light", extra='cpus = "0"\ncpu_weight = 256')
    for ip in (ip1, ip2):
        host.http(ip, "/burn?seconds=30")
    time.sleep(1)
    heavy, light = cpu_share([v1["pid"], v2["pid"]], seconds=4)
    print(f"\nshared CPU 0: weight 512 -> {heavy:.1f}%, weight 256 -> {light:.1f}%")
    assert heavy > 1.4 * light, f"weight 512 got {heavy:.0f}%, weight 256 got {light:.0f}%"
    rows = json.loads(host.gridvm("vcpu-list", "heavy", "--json").stdout)
    assert rows[0]["affinity"] == "0"
    host.gridvm("vcpu-pin", "heavy", "0", "all")
    rows = json.loads(host.gridvm("vcpu-list", "heavy", "--json").stdout)
    assert rows[0]["affinity"] == f"0-{os.cpu_count() - 1}" if os.cpu_count() != 1 else "0"
    host.gridvm("destroy", "heavy")
    host.gridvm("destroy", "light")


def test_balloon_changes_current_memory(host: HostEnv) -> None:
    _, v = boot(host, "bal1", extra="maxmem = 256", memory=128)
    assert v["maxmem"] == 256
    deadline = time.monotonic() + 20
    while view(host, "bal1")["memory"] != 128 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view(host, "bal1")["memory"] == 128  # ballooned down from 256 at start
    host.gridvm("mem-set", "bal1", "96")
    deadline = time.monotonic() + 20
    while view(host, "bal1")["memory"] != 96 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view(host, "bal1")["memory"] == 96
    bad = host.gridvm("mem-set", "bal1", "512", check=False)
    assert bad.returncode != 0 and "maxmem" in bad.stderr
    host.gridvm("mem-max", "bal1", "200")
    assert view(host, "bal1")["maxmem"] == 200
    host.gridvm("destroy", "bal1")


def test_block_throttle_limits_write_throughput(host: HostEnv) -> None:
    disk = host.tmp / "thr.raw"
    procs.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"])
    ip, _ = boot(host, "blk1", extra=f"disk = ['file:{disk},xvda,w,bps_wr=1M']")

    def rate(mb: int) -> float:
        body = host.http(ip, f"/write?mb={mb}", timeout=60)
        return float(re.search(r"= ([\d.]+) MB/s", body).group(1))  # type: ignore[union-attr]

    limited = rate(4)  # QEMU lets a short burst through before the 1 MiB/s limit bites
    assert limited < 2.0, f"bps_wr=1M from the config gave {limited} MB/s"
    host.gridvm("block-throttle", "blk1", "xvda", "--bps-wr", "0")
    free = rate(8)
    host.gridvm("block-throttle", "blk1", "xvda", "--bps", "2M")
    live = rate(6)
    print(f"\nguest writes: bps_wr=1M -> {limited} MB/s, none -> {free}, bps=2M -> {live}")
    assert limited < live < 3.2 < free, f"free {free} MB/s, live 2M limit {live} MB/s"
    err = host.gridvm("block-throttle", "blk1", "xvdz", "--bps", "1M", check=False)
    assert err.returncode != 0 and "no disk 'xvdz'" in err.stderr
    host.gridvm("destroy", "blk1")


@contextlib.contextmanager
def file_server(host: HostEnv, directory: Path) -> Iterator[str]:
    """A Python HTTP server on the host side of the test's bridge (inside its netns)."""
    addr = f"{host.subnet}.1"
    proc = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-m", "http.server",
                             "--bind", addr, "8099", "--directory", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        yield f"http://{addr}:8099"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_vif_rate_shapes_guest_traffic(host: HostEnv) -> None:
    www = host.tmp / "www"
    www.mkdir()
    (www / "blob").write_bytes(os.urandom(1024 * 1024))
    ip, _ = boot(host, "net1", extra="vif = ['bridge=xenbr0, rate=2Mb/s']")

    def fetch_seconds() -> float:
        start = time.monotonic()
        body = host.http(ip, f"/fetch?url={url}/blob", timeout=60)
        assert body.startswith("status 200"), body[:80]
        return time.monotonic() - start

    with file_server(host, www) as url:
        # The 1 MiB crosses the vif twice (fetched in, returned to us): 2 MiB at 2 Mb/s is
        # 8.4 s if both directions are shaped.
        limited = fetch_seconds()
        host.gridvm("network-rate", "net1", "0", "none")
        free = fetch_seconds()
        host.gridvm("network-rate", "net1", "0", "4Mb/s")
        live = fetch_seconds()
    print(f"\n1 MiB fetch: 2Mb/s -> {limited:.2f}s, none -> {free:.2f}s, 4Mb/s -> {live:.2f}s")
    assert limited > 7.0 and free < limited / 4, f"limited {limited:.1f}s, free {free:.1f}s"
    assert free < live < limited, f"4Mb/s took {live:.1f}s (2Mb/s {limited:.1f}s)"
    err = host.gridvm("network-rate", "net1", "0", "fast", check=False)
    assert err.returncode != 0 and "fast" in err.stderr
    host.gridvm("destroy", "net1")


def ping_replies(host: HostEnv, ip: str, count: int = 300, interval: float = 0.005) -> int:
    """Echo replies the guest sent back to `count` pings from the host side of the bridge."""
    out = subprocess.run(["ip", "netns", "exec", host.ns, "busybox", "ping", "-q", "-c", str(count),
                          "-i", str(interval), "-W", "1", ip], capture_output=True, text=True,
                         timeout=60).stdout
    return int(re.search(r"(\d+) (?:packets )?received", out).group(1))  # type: ignore[union-attr]


def test_vif_pps_polices_guest_packets(host: HostEnv) -> None:
    ip, v = boot(host, "pps1", extra="vif = ['bridge=xenbr0, pps=50']")
    limited = ping_replies(host, ip)           # 300 echoes in ~1.5 s; 50/s get answers out
    host.gridvm("network-pps", "pps1", "0", "0")
    free = ping_replies(host, ip)
    host.gridvm("network-pps", "pps1", "0", "100")
    live = ping_replies(host, ip)
    print(f"\n300 pings in 1.5 s: pps=50 -> {limited} replies, none -> {free}, pps=100 -> {live}")
    assert limited < 130 and free > 250 and limited < live < free, (limited, live, free)
    tables = subprocess.run(["ip", "netns", "exec", host.ns, "nft", "list", "tables", "bridge"],
                            capture_output=True, text=True, check=True).stdout
    assert tables.count("gridvm_pps_") == 1
    err = host.gridvm("network-pps", "pps1", "0", "20000000", check=False)
    assert err.returncode != 0 and "invalid pps" in err.stderr, err.stderr
    host.gridvm("destroy", "pps1")
    tables = subprocess.run(["ip", "netns", "exec", host.ns, "nft", "list", "tables", "bridge"],
                            capture_output=True, text=True, check=True).stdout
    assert "gridvm_pps_" not in tables


def groups(host: HostEnv, domid: int, control: str = "") -> list[Path]:
    """This home's cgroup directories (or files `control`) of domid."""
    parent = cgroup_parent(host.agent.home)
    return list(Path("/sys/fs/cgroup").glob(f"**/{parent}/dom{domid}/{control}".rstrip("/")))


def cgroup_value(host: HostEnv, domid: int, control: str) -> str:
    found = groups(host, domid, control)
    assert found, f"no cgroup file {control} for domid {domid}"
    return found[0].read_text().strip()


def test_settings_survive_daemon_restart(host: HostEnv) -> None:
    _, v = boot(host, "keep2", extra="cpu_weight = 512\ncpu_cap = 50")
    host.gridvm("sched-credit", "-d", "keep2", "-w", "1024")
    version2 = Path("/sys/fs/cgroup/cgroup.controllers").exists() and "cpu" in Path(
        "/sys/fs/cgroup/cgroup.controllers").read_text()
    control = "cpu.max" if version2 else "cpu.cfs_quota_us"
    before = cgroup_value(host, v["domid"], control)
    host.agent.stop(kill=True)
    host.agent.start()
    rows = json.loads(host.gridvm("sched-credit", "-d", "keep2", "--json").stdout)
    assert rows[0]["weight"] == 1024 and rows[0]["cap"] == 50
    assert cgroup_value(host, v["domid"], control) == before
    host.gridvm("destroy", "keep2")
    assert not groups(host, v["domid"])


def test_mem_limit_caps_qemu_host_memory(host: HostEnv) -> None:
    _, v = boot(host, "meml", extra="maxmem = 192\nmem_limit = 512")
    v1 = not Path("/sys/fs/cgroup/cgroup.controllers").exists() or "memory" not in Path(
        "/sys/fs/cgroup/cgroup.controllers").read_text()
    control = "memory.limit_in_bytes" if v1 else "memory.max"
    assert cgroup_value(host, v["domid"], control) == str(512 << 20)
    assert str(v["pid"]) in cgroup_value(host, v["domid"], "cgroup.procs").split()
    usage = int(cgroup_value(host, v["domid"], "memory.usage_in_bytes" if v1
                             else "memory.current"))
    assert 16 << 20 < usage < 512 << 20, f"QEMU charged {usage >> 20} MiB"
    host.gridvm("mem-limit", "meml", "400")
    assert cgroup_value(host, v["domid"], control) == str(400 << 20)
    assert view(host, "meml")["config"]["mem_limit"] == 400 if "config" in view(
        host, "meml") else True
    bad = host.gridvm("mem-limit", "meml", "150", check=False)
    assert bad.returncode != 0 and "more than its maxmem" in bad.stderr, bad.stderr
    host.gridvm("mem-limit", "meml", "0")
    assert int(cgroup_value(host, v["domid"], control).replace("max", str(1 << 62))) > 1 << 40
    print(f"\nQEMU of a 192 MiB tiny guest charges {usage >> 20} MiB to its memory cgroup")
    host.gridvm("destroy", "meml")
    assert not groups(host, v["domid"])
    cfg, _ = host.write_cfg("badlim", extra="maxmem = 192\nmem_limit = 100")
    proc = host.gridvm("create", str(cfg), check=False)
    assert proc.returncode != 0 and "mem_limit" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sched-credit", "-d", "{dom}", "-w", "0"], "invalid weight 0"),
        (["sched-credit", "-d", "{dom}", "-c", "-1"], "invalid cap -1"),
        (["sched-credit", "-d", "ghost", "-w", "300"], "does not exist"),
        (["vcpu-pin", "{dom}", "0", "99"], "CPU 99"),
        (["vcpu-pin", "{dom}", "7", "0"], "no vcpu 7"),
        (["network-rate", "{dom}", "0", "10Mb/h"], "10Mb/h"),
        (["mem-set", "{dom}", "4"], "invalid memory"),
    ],
)
def test_invalid_values_are_rejected(host: HostEnv, args: list[str], message: str) -> None:
    if not any(v["name"] == "bad1" for v in host.domains()):
        boot(host, "bad1", extra="vif = ['bridge=xenbr0, rate=10Mb/s']")
    proc = host.gridvm(*[a.format(dom="bad1") for a in args], check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_bad_config_values_are_rejected(host: HostEnv) -> None:
    for extra, message in (("cpu_weight = 0", "weight"), ("cpu_cap = -1", "cap"),
                           ("vif = ['bridge=xenbr0, rate=fast']", "rate")):
        cfg, _ = host.write_cfg("badcfg", extra=extra)
        proc = host.gridvm("create", str(cfg), check=False)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr)
    assert not any(v["name"] == "badcfg" for v in host.domains())
