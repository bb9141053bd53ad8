"""Test fixtures: a gridvmd in its own network namespace with a bridge, driven like a user."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from gridvm.host import httpprobe, netdevs, netns, procs
from gridvm.host.resources import remove_home_groups
from gridvm.images.store import ImageInfo
from gridvm.lab.agent import Agent

_ns_counter = itertools.count(1)

XM_PV = """\
name = "{name}"
memory = {memory}
kernel = "{kernel}"
ramdisk = "{ramdisk}"
vif = [ 'bridge={bridge}' ]
ip = "{ip}"
netmask = "255.255.255.0"
hostname = "{name}"
{extra}
"""

XM_HVM = """\
name = "{name}"
builder = "hvm"
memory = {memory}
disk = [ 'tap:qcow2:{disk},hda,w' ]
vif = [ 'type=ioemu, model=e1000, bridge={bridge}' ]
ip = "{ip}"
netmask = "255.255.255.0"
hostname = "{name}"
{extra}
"""


@dataclass
class HostEnv:
    agent: Agent
    ns: str
    subnet: str
    image: ImageInfo
    tmp: Path
    bridge: str = "xenbr0"
    _ips: Iterator[int] = field(default_factory=lambda: itertools.count(10))

    @property
    def home(self) -> Path:
        return self.agent.home.root

    def gridvm(self, *args: str, check: bool = True, input: str | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, GRIDVM_HOME=str(self.home))
        proc = subprocess.run([sys.executable, "-m", "gridvm", *args], env=env, text=True,
                              capture_output=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"gridvm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def next_ip(self) -> str:
        return f"{self.subnet}.{next(self._ips)}"

    def write_cfg(self, name: str, *, hvm: bool = False, memory: int = 128,
                  ip: str | None = None, extra: str = "") -> tuple[Path, str]:
        ip = ip or self.next_ip()
        template = XM_HVM if hvm else XM_PV
        text = template.format(name=name, memory=memory, kernel=self.image.kernel,
                               ramdisk=self.image.ramdisk, disk=self.hvm_disk(name) if hvm
                               else "", bridge=self.bridge, ip=ip, extra=extra)
        path = self.tmp / f"{name}.cfg"
        path.write_text(text)
        return path, ip

    def hvm_disk(self, name: str) -> Path:
        """A private copy-on-write overlay of the tiny HVM disk."""
        assert self.image.disk is not None
        path = self.tmp / f"{name}-disk.qcow2"
        if not path.exists():
            procs.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                       str(self.image.disk), str(path)])
        return path

    def http(self, ip: str, path: str = "/", timeout: float = 2.0) -> str:
        return httpprobe.get(ip, path, ns=self.ns, timeout=timeout)

    def wait_http(self, ip: str, path: str = "/", timeout: float = 90) -> str:
        return httpprobe.wait_http(ip, path, ns=self.ns, timeout=timeout)

    def wait_new_boot(self, ip: str, old: str, timeout: float = 90) -> str:
        """Poll /bootid until it differs from `old` (the guest has rebooted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                boot = self.http(ip, "/bootid", timeout=1.0)
                if boot != old:
                    return boot
            time.sleep(0.2)
        raise AssertionError(f"{ip} did not reboot within {timeout:.0f}s")

    def crash(self, ip: str) -> None:
        """Make the guest panic (it may die before it answers)."""
        with contextlib.suppress(OSError):
            self.http(ip, "/crash", timeout=1.0)

    def domains(self) -> list[dict[str, Any]]:
        c = self.agent.client()
        try:
            views: list[dict[str, Any]] = c.get("/domains")
            return views
        finally:
            c.close()

    def qemu_pids(self) -> list[int]:
        """QEMU processes that belong to this home."""
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                argv = procs.cmdline(int(entry.name))
                if argv and "qemu-system" in argv[0] and any(str(self.home) in a for a in argv):
                    out.append(int(entry.name))
        return out

    def taps(self) -> list[str]:
        def names() -> list[str]:
            with IPRoute() as ipr:
                return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()
                        if str(link.get_attr("IFLA_IFNAME")).startswith("vif")]
        return netns.call_in(self.ns, names)

    def assert_clean(self) -> None:
        """Nothing of a stopped domain remains: process, tap, run dir, record."""
        assert self.qemu_pids() == [], "a QEMU process was left behind"
        assert self.taps() == [], f"taps left behind: {self.taps()}"
        rundirs = list((self.home / "run").iterdir()) if (self.home / "run").exists() else []
        assert rundirs == [], f"run directories left behind: {rundirs}"


def make_bridge(ns: str, name: str, address: str) -> None:
    netns.call_in(ns, lambda: netdevs.host_bridge(name, f"{address}/24"))


@contextlib.contextmanager
def host_env(image: ImageInfo, tmp: Path, images: Path) -> Iterator[HostEnv]:
    n = next(_ns_counter)
    ns = f"gvtest{os.getpid()}x{n}"
    subnet = f"10.{200 + n % 50}.{os.getpid() % 250}"
    netns.create(ns)
    agent = Agent(tmp / "home", ns=ns, accel="tcg", images=images)
    env = HostEnv(agent, ns, subnet, image, tmp)
    try:
        make_bridge(ns, env.bridge, f"{subnet}.1")
        agent.start()
        yield env
    finally:
        with contextlib.suppress(Exception):
            agent.destroy_all()
        agent.stop()
        for pid in env.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        netns.remove(ns)
        remove_home_groups(agent.home)


@pytest.fixture(scope="module")
def host(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory,
         test_images_dir: Path) -> Iterator[HostEnv]:
    with host_env(tiny_image, tmp_path_factory.mktemp("host"), test_images_dir) as env:
        yield env
