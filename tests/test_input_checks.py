"""Regression tests without guests: hostile values stop at the domain model (the one
validation every entry point shares), QEMU option values are escaped, user-named files
are read only when they are regular and small, and client paths cannot escape their
resource."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gridvm.api.client import q
from gridvm.cluster.settings import ClusterConfig
from gridvm.config.model import MAX_VIFS, DomainConfig
from gridvm.config.xmfile import load_config, parse_config
from gridvm.errors import ConfigError
from gridvm.files import FileRefused, read_regular
from gridvm.host.migration import DiskCopy, PrepareAnswer
from gridvm.host.savefile import SaveFileError, read_header
from gridvm.host.vm import qemu_taps
from gridvm.qemu.argv import build_argv

BASE: dict[str, Any] = {"name": "esc", "kernel": "/k", "ramdisk": "/r", "memory": 96}


def bad(**update: Any) -> str:
    with pytest.raises(ValidationError) as info:
        DomainConfig.model_validate({**BASE, **update})
    return str(info.value)


@pytest.mark.parametrize("update, why", [
    ({"vifs": [{"model": "e1000,romfile=/etc/shadow"}]}, "unknown NIC model"),
    ({"vifs": [{"model": "virtio-net-pci,romfile=/x"}]}, "unknown NIC model"),
    ({"disks": [{"target": "/x.img", "vdev": "xvda,serial=INJECTED"}]}, "bad virtual device"),
    ({"vifs": [{"bridge": "br\x00x"}]}, "bad interface name"),
    ({"vifs": [{"bridge": "br0 x"}]}, "bad interface name"),
    ({"vifs": [{"vifname": "v\x00"}]}, "bad interface name"),
    ({"vifs": [{"vifname": ".."}]}, "bad interface name"),
    ({"net": {"ip": "1.2.3.4 init=/bin/sh"}}, "not an IP address"),
    ({"net": {"hostname": "h init=/bin/sh"}}, "bad host name"),
    ({"net": {"gateway": "10.0.0.1\n"}}, "not an IP address"),
    ({"vifs": [{"ip": "10.0.0.2 init=/bin/sh"}]}, "bad ip"),
    ({"vifs": [{"mac": "01:16:3e:00:00:01"}]}, "multicast"),
    ({"vifs": [{"rate": "10Mb/s,x=y"}]}, "bad rate"),
    ({"name": "web1\n"}, "invalid domain name"),
    ({"name": "../networks/rpn1"}, "invalid domain name"),
    ({"kernel": "vmlinuz"}, "not an absolute path"),
    ({"disks": [{"target": "x.img", "vdev": "xvda"}]}, "not an absolute path"),
    ({"disks": [{"target": "/x\x00.img", "vdev": "xvda"}]}, "not a usable path"),
    ({"extra": "quiet\nroot=/dev/evil"}, "control characters"),
    ({"boot": "c\n"}, "boot"),
    ({"cpus": "0-1;rm"}, "bad cpu list"),
    ({"vifs": [{}] * (MAX_VIFS + 1)}, "at most"),
    ({"disks": [{"target": "/a", "vdev": "xvda"}, {"target": "/b", "vdev": "xvda"}]},
     "used twice"),
    ({"ha": {"hosts": ["h1", "h2;x"]}}, "bad host name"),
])
def test_the_model_refuses_what_the_file_reader_refuses(update: dict[str, Any],
                                                         why: str) -> None:
    assert why in bad(**update)


def argv_of(cfg: DomainConfig, tmp_path: Path) -> list[str]:
    return build_argv("qemu", cfg, accel="tcg", rundir=tmp_path, taps=["vif1.0"])


def test_option_values_double_their_commas(tmp_path: Path) -> None:
    cfg = DomainConfig.model_validate({**BASE, "disks": [
        {"target": "/srv/tools,v2.img", "vdev": "xvda"}]})
    drives = [a for a in argv_of(cfg, tmp_path) if a.startswith("if=none")]
    assert drives and "file=/srv/tools,,v2.img," in drives[0]
    # xl's target= takes the rest of the entry: the comma belongs to the file name.
    got = parse_config('name = "x"\nkernel = "/k"\n'
                       'disk = [ "vdev=xvda, target=/x/c.img,snapshot=on" ]\n').config
    assert got.disks[0].target == "/x/c.img,snapshot=on"
    drive = next(a for a in argv_of(got, tmp_path) if a.startswith("if=none"))
    assert "file=/x/c.img,,snapshot=on," in drive and ",snapshot=on," not in drive.replace(
        ",,", "")


def test_taps_are_read_back_from_a_qemu_command_line(tmp_path: Path) -> None:
    cfg = DomainConfig.model_validate({**BASE, "vifs": [{}, {"vifname": "web.0"}]})
    argv = build_argv("qemu", cfg, accel="tcg", rundir=tmp_path, taps=["vif3.0", "web.0"])
    assert qemu_taps(argv) == ["vif3.0", "web.0"]


def test_peers_cannot_hand_the_source_a_shell_command() -> None:
    with pytest.raises(ValidationError):
        PrepareAnswer(id="m", uri="exec:cat /etc/shadow", domid=1)
    with pytest.raises(ValidationError):
        PrepareAnswer(id="m", uri="tcp:10.0.0.1:4000", domid=1, nbd={"vbd0": "file:/x"})
    assert PrepareAnswer(id="m", uri="tcp:[fd00::1]:4000", domid=1).uri
    with pytest.raises(ValidationError):
        DiskCopy(index=0, vdev="xvda", path="/a", local="../../etc/x", format="raw", size=1,
                 ident=(1, 2))


def test_cluster_settings_refuse_a_control_character_as_etcd() -> None:
    with pytest.raises(ValidationError):
        ClusterConfig(etcd="\x0e", host="h1")
    with pytest.raises(ValidationError):
        ClusterConfig(etcd="http://10.0.0.3:2379", host="h1\n")
    assert ClusterConfig(etcd="http://10.0.0.3:2379", host="h1").etcd


def test_path_segments_are_quoted_and_cannot_climb() -> None:
    assert q("web 1") == "web%201"
    assert q("a?b#c") == "a%3Fb%23c"
    for ref in ("../networks/rpn1", "..", ".", "", "a/b"):
        with pytest.raises(ConfigError):
            q(ref)


def in_thread(fn: Any, timeout: float = 5.0) -> Any:
    """Run `fn`; fail (instead of hanging the suite) if it does not return in time."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert box, "blocked"
    return box[0]


def test_a_fifo_or_a_device_is_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.cfg"
    os.mkfifo(fifo)
    got = in_thread(lambda: load_config(fifo))
    assert isinstance(got, ConfigError) and "FIFO" in str(got)
    got = in_thread(lambda: load_config("/dev/zero"))
    assert isinstance(got, ConfigError) and "character device" in str(got)
    got = in_thread(lambda: load_config(tmp_path))
    assert isinstance(got, ConfigError) and "directory" in str(got)
    got = in_thread(lambda: read_header(fifo))
    assert isinstance(got, SaveFileError) and "FIFO" in str(got)
    big = tmp_path / "big.cfg"
    big.write_bytes(b"#" * 5_000_001)
    assert isinstance(in_thread(lambda: load_config(big)), ConfigError)
    with pytest.raises(FileRefused):
        read_regular(tmp_path / "x\0y", limit=10)


def test_cli_dry_run_on_a_fifo_and_dev_zero_fails_fast(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.cfg"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        proc = subprocess.run([sys.executable, "-m", "gridvm", "create", "--dry-run", path],
                              capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, GRIDVM_HOME=str(tmp_path / "home")))
        assert proc.returncode != 0
        assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_save_file_headers_that_would_crash_the_daemon(tmp_path: Path) -> None:
    from gridvm.host.savefile import _LEN, MAGIC

    deep = tmp_path / "deep.save"
    body = b'{"config":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep.write_bytes(MAGIC + _LEN.pack(len(body)) + body)
    with pytest.raises(SaveFileError, match="damaged header"):
        read_header(deep)
    huge = tmp_path / "huge.save"
    huge.write_bytes(MAGIC + _LEN.pack(2**31) + b"{}")
    with pytest.raises(SaveFileError, match="damaged header"):
        read_header(huge)
    bad_cfg = tmp_path / "bad.save"
    body = b'{"config": {"name": "x", "vifs": [{"model": "e1000,romfile=/etc/shadow"}]}}'
    bad_cfg.write_bytes(MAGIC + _LEN.pack(len(body)) + body)
    with pytest.raises(SaveFileError, match="NIC model"):
        read_header(bad_cfg)
    with pytest.raises(SaveFileError):
        read_header(tmp_path)
