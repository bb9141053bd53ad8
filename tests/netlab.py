"""Test helpers for networks and labs: a lab made with the gridvm CLI, driven like a user.

All traffic stays inside the lab's namespaces: probes run in the lab's client namespace or
in a host's namespace, never in the test runner's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from gridvm.errors import GridvmError
from gridvm.host import httpprobe, netns, procs
from gridvm.images.store import ImageInfo
from gridvm.lab import lab as labmod

_labs = itertools.count(1)

PV_CFG = """\
name = "{name}"
memory = 96
kernel = "{kernel}"
ramdisk = "{ramdisk}"
vif = [ '{vif}' ]
hostname = "{name}"
{extra}
"""


@dataclass
class LabEnv:
    name: str
    home: Path            # the CLI's home (the lab's hosts live under home/labs/<name>)
    tmp: Path
    image: ImageInfo

    def gridvm(self, *args: str, host: str | None = None, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "GRIDVM_HOST"}
        env["GRIDVM_HOME"] = str(self.home)
        env["GRIDVM_IMAGES"] = str(self.image.kernel.parent.parent)
        argv = [sys.executable, "-m", "gridvm"]
        if host:
            argv += ["--host", f"{self.name}/{host}"]
        proc = subprocess.run([*argv, *args], env=env, text=True, capture_output=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"gridvm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def fails(self, *args: str, host: str | None = None) -> str:
        """Run a command that must fail; return its one-line error."""
        proc = self.gridvm(*args, host=host, check=False)
        assert proc.returncode == 1, f"gridvm {' '.join(args)} did not fail: {proc.stdout}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gridvm: error: "), proc.stderr
        return lines[0].removeprefix("gridvm: error: ")

    @property
    def state(self) -> labmod.LabState:
        return labmod.load(self.name)

    @property
    def shared(self) -> Path:
        """The lab's shared storage: the one directory every lab machine sees (its /tmp is
        its own)."""
        return labmod.shared_dir(self.state)

    def ns(self, host: str) -> str:
        return self.state.client.ns if host == "client" else self.state.host(host).ns

    def addr(self, host: str) -> str:
        return self.state.host(host).address.split("/")[0]

    def guest_ip(self, n: int) -> str:
        """A static address for a bridged guest on the LAN."""
        return str(ipaddress.IPv4Network(self.state.subnet).network_address + 100 + n)

    def write_cfg(self, name: str, vif: str, extra: str = "") -> Path:
        path = self.tmp / f"{name}.cfg"
        path.write_text(PV_CFG.format(name=name, kernel=self.image.kernel,
                                      ramdisk=self.image.ramdisk, vif=vif, extra=extra))
        return path

    def create(self, host: str, name: str, vif: str, extra: str = "") -> None:
        self.gridvm("create", str(self.write_cfg(name, vif, extra)), host=host)

    def network(self, host: str, name: str) -> dict[str, Any]:
        view: dict[str, Any] = json.loads(
            self.gridvm("network", "show", name, "--json", host=host).stdout)
        return view

    def http(self, ip: str, path: str = "/", *, port: int = 80, via: str = "client",
             timeout: float = 3.0) -> str:
        return netns.call_in(self.ns(via), lambda: httpprobe.http_get(
            ip, path, port=port, timeout=timeout))

    def wait_http(self, ip: str, *, port: int = 80, via: str = "client",
                  timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.http(ip, port=port, via=via, timeout=2)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def fetch(self, ip: str, url: str, *, port: int = 80, via: str = "client") -> str:
        """Ask the guest answering at ip:port to GET `url`: 'status 200\\nBODY' or 'status 0…'."""
        q = urllib.parse.quote(url, safe="")
        return self.http(ip, f"/fetch?url={q}", port=port, via=via, timeout=15)

    def links(self, host: str) -> list[str]:
        def names() -> list[str]:
            with IPRoute() as ipr:
                return [str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()]
        return netns.call_in(self.ns(host), names)

    def run_in(self, host: str, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], check=True,
                              text=True, capture_output=True, timeout=30).stdout

    def pids(self, host: str, word: str) -> list[int]:
        """Processes in a host's namespace whose command line contains `word`."""
        return [p for p in labmod.namespace_pids(self.ns(host))
                if any(word in a for a in procs.cmdline(p))]

    @contextlib.contextmanager
    def http_server(self, host: str, address: str, port: int = 8000) -> Iterator[Path]:
        """A tiny HTTP server in a host's (or the client's) namespace; yields its log."""
        log = self.tmp / f"http-{host}-{port}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), sys.executable, "-m", "http.server",
                 "--bind", address, str(port)], stdout=out, stderr=subprocess.STDOUT,
                cwd=self.tmp)
        try:
            deadline = time.monotonic() + 15
            while "Serving HTTP" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield log
        finally:
            proc.kill()
            proc.wait(timeout=10)


def wait_for(what: str, fn: Any, timeout: float = 60) -> Any:
    """Poll `fn` until it returns something true (errors count as not yet); its result."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
            if got:
                return got
        except (GridvmError, OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def new_lab(image: ImageInfo, tmp: Path, hosts: int = 2, *lab_args: str) -> LabEnv:
    """`gridvm lab up` with TCG hosts (`lab_args` e.g. "--cluster", "--ttl", "3")."""
    env = LabEnv(f"gt{os.getpid() % 100000}x{next(_labs)}", tmp / "home", tmp, image)
    env.gridvm("lab", "up", "--hosts", str(hosts), "--name", env.name, "--accel", "tcg",
               *lab_args)
    return env


@contextlib.contextmanager
def lab_env(image: ImageInfo, tmp: Path, hosts: int = 2, *lab_args: str) -> Iterator[LabEnv]:
    env = new_lab(image, tmp, hosts, *lab_args)
    try:
        yield env
    finally:
        env.gridvm("lab", "down", "--name", env.name, check=False)
