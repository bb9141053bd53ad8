"""Domain lifecycle through the gridvm CLI and gridvmd, with real QEMU guests (TCG)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hostlab import HostEnv

pytestmark = pytest.mark.guest


def view(host: HostEnv, name: str) -> dict:
    return json.loads(host.gridvm("list", name, "--json").stdout)[0]


def wait_state(host: HostEnv, name: str, states: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [v for v in host.domains() if v["name"] == name]
        if found and found[0]["state"] in states:
            return found[0]
        if not found and "gone" in states:
            return {}
        time.sleep(0.2)
    raise AssertionError(f"{name} did not reach {states}: {found}")


def test_pv_guest_lifecycle(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("web1")
    out = host.gridvm("create", str(cfg)).stdout
    assert "Started domain web1" in out
    assert host.wait_http(ip) == "web1"
    assert host.http(ip, "/health") == "ok"

    listing = host.gridvm("list").stdout
    assert "Domain-0" in listing and "web1" in listing
    v = view(host, "web1")
    assert v["state"] == "running" and v["memory"] == 128 and v["vifs"][0]["mac"].startswith(
        "00:16:3e:")
    domid = host.gridvm("domid", "web1").stdout.strip()
    assert domid == str(v["domid"])
    assert host.gridvm("domname", domid).stdout.strip() == "web1"
    assert "web1" in host.gridvm("uptime").stdout
    info = json.loads(host.gridvm("info", "--json").stdout)
    assert info["accel"] == "tcg" and "forced" in info["accel_reason"]
    assert "Linux version" in host.gridvm("dmesg", "-n", "5000", "web1").stdout

    # by uuid and domid too
    assert view(host, v["uuid"])["name"] == "web1"
    host.gridvm("pause", domid)
    assert view(host, "web1")["state"] == "paused"
    assert [d["state"] for d in host.domains() if d["name"] == "web1"] == ["paused"]
    with pytest.raises(OSError):
        host.http(ip, "/health", timeout=1.0)
    host.gridvm("unpause", "web1")
    assert host.wait_http(ip, "/health", timeout=10) == "ok"

    host.gridvm("rename", "web1", "web1b")
    assert view(host, "web1b")["domid"] == v["domid"]

    host.gridvm("destroy", "web1b")
    assert [d for d in host.domains() if d["name"] == "web1b"] == []
    host.assert_clean()


def test_hvm_guest_gets_settings_through_firmware(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("hvm1", hvm=True)
    host.gridvm("create", str(cfg))
    assert host.wait_http(ip, timeout=120) == "hvm1"
    v = view(host, "hvm1")
    assert v["type"] == "hvm"
    host.gridvm("shutdown", "-w", "hvm1", "--timeout", "60")
    wait_state(host, "hvm1", {"gone"})
    host.assert_clean()


def test_shutdown_reboot_and_bootid(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("rb1")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    boot1 = host.http(ip, "/bootid")
    domid = view(host, "rb1")["domid"]
    host.gridvm("reboot", "-w", "rb1", "--timeout", "60")
    host.wait_new_boot(ip, boot1)
    assert view(host, "rb1")["domid"] == domid
    host.gridvm("shutdown", "-w", "rb1", "--timeout", "60")
    assert [d for d in host.domains() if d["name"] == "rb1"] == []
    host.assert_clean()


@pytest.mark.parametrize(
    ("action", "expect"),
    [("restart", "running"), ("destroy", "gone"), ("preserve", "crashed"),
     ("coredump-destroy", "gone"), ("rename-restart", "renamed")],
)
def test_on_crash_actions(host: HostEnv, action: str, expect: str) -> None:
    name = f"cr-{action}"
    cfg, ip = host.write_cfg(name, extra=f'on_crash = "{action}"')
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    boot1 = host.http(ip, "/bootid")
    domid = view(host, name)["domid"]
    host.crash(ip)
    if expect == "running":
        host.wait_new_boot(ip, boot1)
        assert view(host, name)["state"] == "running"
    elif expect == "gone":
        wait_state(host, name, {"gone"})
        if action.startswith("coredump"):
            cores = list((host.home / "dumps").glob(f"{name}.{domid}.*.core"))
            assert cores and cores[0].stat().st_size > 64 * 1024 * 1024
            cores[0].unlink()
    elif expect == "crashed":
        v = wait_state(host, name, {"crashed"})
        assert v["domid"] == domid
    elif expect == "renamed":
        old = wait_state(host, f"{name}-{domid}", {"crashed"})
        assert old["domid"] == domid
        host.wait_new_boot(ip, boot1)
        new = view(host, name)
        assert new["domid"] != domid and new["state"] == "running"
        host.gridvm("destroy", f"{name}-{domid}")
    if expect != "gone":
        host.gridvm("destroy", name)
    wait_state(host, name, {"gone"})
    host.assert_clean()


def test_on_poweroff_restart_and_on_reboot_destroy(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("pw1", extra='on_poweroff = "restart"\non_reboot = "destroy"')
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    boot1 = host.http(ip, "/bootid")
    host.gridvm("shutdown", "pw1")
    host.wait_new_boot(ip, boot1)
    host.gridvm("reboot", "pw1")
    wait_state(host, "pw1", {"gone"})
    host.assert_clean()


def test_daemon_restart_readopts_running_guest(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("keep1")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    boot = host.http(ip, "/bootid")
    before = view(host, "keep1")
    host.agent.stop(kill=True)          # kill -9 the daemon
    assert host.http(ip, "/bootid") == boot  # the guest does not notice
    assert "not running" in host.gridvm("list", check=False).stderr
    host.agent.start()
    after = view(host, "keep1")
    assert after["domid"] == before["domid"] and after["state"] == "running"
    assert after["pid"] == before["pid"]
    # still supervised: a crash is seen and handled by the new daemon
    host.crash(ip)
    host.wait_new_boot(ip, boot)
    host.gridvm("destroy", "keep1")
    host.assert_clean()


def test_save_and_restore_keep_the_boot(host: HostEnv, tmp_path: Path) -> None:
    cfg, ip = host.write_cfg("sv1")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    boot = host.http(ip, "/bootid")
    mac = view(host, "sv1")["vifs"][0]["mac"]
    save = tmp_path / "sv1.save"
    host.gridvm("save", "sv1", str(save))
    assert save.stat().st_size > 1024 * 1024
    assert [d for d in host.domains() if d["name"] == "sv1"] == []
    host.assert_clean()
    err = host.gridvm("save", "nosuch", str(tmp_path / "x.save"), check=False)
    assert err.returncode != 0 and "does not exist" in err.stderr
    host.gridvm("restore", str(save))
    assert host.wait_http(ip, "/bootid", timeout=30) == boot
    assert view(host, "sv1")["vifs"][0]["mac"] == mac
    bad = tmp_path / "bad.save"
    bad.write_text("not a save file")
    err = host.gridvm("restore", str(bad), check=False)
    assert err.returncode != 0 and "not a gridvm save file" in err.stderr
    host.gridvm("destroy", "sv1")
    host.assert_clean()


def test_managed_domain_new_start_delete(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("mg1")
    host.gridvm("new", str(cfg))
    assert view(host, "mg1")["state"] == "shutoff"
    host.gridvm("start", "mg1")
    host.wait_http(ip)
    err = host.gridvm("delete", "mg1", check=False)
    assert err.returncode != 0 and "running" in err.stderr
    host.gridvm("shutdown", "-w", "mg1", "--timeout", "60")
    assert view(host, "mg1")["state"] == "shutoff"
    host.gridvm("delete", "mg1")
    assert [d for d in host.domains() if d["name"] == "mg1"] == []
    host.assert_clean()


def test_console_gives_a_shell(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("con1")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    out = host.gridvm("console", "con1", input="\necho hello-$((40+2))\n", timeout=30).stdout
    assert "hello-42" in out
    host.gridvm("destroy", "con1")


def test_dry_run_prints_normalized_domain(host: HostEnv) -> None:
    cfg, _ = host.write_cfg("dry1")
    data = json.loads(host.gridvm("create", "--dry-run", str(cfg)).stdout)
    assert data["name"] == "dry1" and data["memory"] == 128 and data["type"] == "pv"
    assert data["vifs"][0]["mac"].startswith("00:16:3e:")
    assert f"ip={data['net']['ip']}:" in data["cmdline"]
    assert data["actions"] == {"on_poweroff": "destroy", "on_reboot": "restart",
                               "on_crash": "restart"}
    assert host.domains() == [] or all(d["name"] != "dry1" for d in host.domains())


# ----- failure paths: a clear one-line error and nothing left behind -----------------------


def _fails(host: HostEnv, *args: str) -> str:
    proc = host.gridvm(*args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridvm: error:"), proc.stderr
    return lines[0]


def test_duplicate_name_is_refused(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("dup1")
    host.gridvm("create", str(cfg))
    host.wait_http(ip)
    assert "already in use" in _fails(host, "create", str(cfg))
    assert len([d for d in host.domains() if d["name"] == "dup1"]) == 1
    assert len(host.qemu_pids()) == 1
    host.gridvm("destroy", "dup1")
    host.assert_clean()


def test_missing_kernel_and_disk(host: HostEnv) -> None:
    cfg = host.tmp / "nokernel.cfg"
    cfg.write_text('name = "nok"\nkernel = "/nonexistent/vmlinuz"\nmemory = 64\n'
                   "vif = ['bridge=xenbr0']\n")
    assert "kernel /nonexistent/vmlinuz does not exist" in _fails(host, "create", str(cfg))
    cfg2, _ = host.write_cfg("nodisk", extra="disk = ['file:/nonexistent.img,xvda,w']")
    assert "does not exist" in _fails(host, "create", str(cfg2))
    assert "config file not found" in _fails(host, "create", str(host.tmp / "missing.cfg"))
    assert host.domains() == []
    host.assert_clean()


def test_memory_beyond_host(host: HostEnv) -> None:
    cfg, _ = host.write_cfg("huge", memory=10_000_000)
    assert "MiB available" in _fails(host, "create", str(cfg))
    assert host.domains() == []
    host.assert_clean()


def test_qemu_dying_at_start_leaves_nothing(host: HostEnv) -> None:
    bad = host.tmp / "notadisk.qcow2"
    bad.write_text("garbage")
    cfg, _ = host.write_cfg("qdie", extra=f"disk = ['tap:qcow2:{bad},xvda,w']")
    msg = _fails(host, "create", str(cfg))
    assert "QEMU failed to start" in msg
    assert host.domains() == []
    host.assert_clean()


def test_unknown_domain_and_no_daemon(host: HostEnv, tmp_path: Path) -> None:
    assert "does not exist" in _fails(host, "destroy", "ghost")
    assert "does not exist" in _fails(host, "shutdown", "ghost")
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gridvm", "list"], text=True,
                          capture_output=True,
                          env=dict(os.environ, GRIDVM_HOME=str(tmp_path / "nohome")))
    assert proc.returncode != 0 and "gridvmd is not running" in proc.stderr
