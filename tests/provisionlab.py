"""Fixtures for real Debian guests: images built once per session (cached by recipe hash in
$GRIDVM_TEST_IMAGES, like the tiny image), a gridvmd with a NAT network, agent helpers."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostlab import HostEnv, host_env

from gridvm.errors import GridvmError
from gridvm.images.store import ImageInfo, get_image
from gridvm.provision import clone as clones
from gridvm.provision.debian import build_debian
from gridvm.provision.recipe import Recipe

TEST_IMAGES = Path(os.environ.get("GRIDVM_TEST_IMAGES", "/var/cache/gridvm/test-images"))
TEST_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGridvmTestKeyNotForLoginXXXXXXXXXXXXXXXXXXXX"
            " test@gridvm")
HELLO_UNIT = """\
[Unit]
Description=gridvm test unit enabled by the recipe
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo hello > /run/gvtest-hello'
[Install]
WantedBy=multi-user.target
"""
TEST_RECIPE: dict[str, Any] = {
    "name": "gvtest",
    "disk_size": "2G",
    "hostname": "gvtest",
    "users": [{"name": "admin", "ssh_keys": [TEST_KEY], "sudo": True}],
    "files": [
        {"path": "/etc/gridvm-test.conf", "content": "hello from the recipe\n", "mode": "0600"},
        {"path": "/etc/systemd/system/gvtest-hello.service", "content": HELLO_UNIT},
    ],
    "services": ["gvtest-hello"],
    "first_boot": ['echo "server_id=${server_id:-none} clone_index=${clone_index:-none} '
                   'hello=$(cat /run/gvtest-hello 2>/dev/null || echo missing)" '
                   '> /root/first-boot.out'],
}
_nets = itertools.count(1)


def test_recipe(arch: str = "amd64") -> Recipe:
    return Recipe.model_validate({**TEST_RECIPE, "arch": arch})


def build_test_image(arch: str) -> ImageInfo:
    """The test image for `arch`, built once and then cached (a template left over from an
    interrupted run is made writable first, so a changed recipe can rebuild it)."""
    name = f"gvtest-{arch}"
    with contextlib.suppress(GridvmError):
        if get_image(TEST_IMAGES, name).template:
            clones.unmark_template(TEST_IMAGES, name)
    return build_debian(TEST_IMAGES, test_recipe(arch), name=name)


@pytest.fixture(scope="session")
def debian_image() -> ImageInfo:
    return build_test_image("amd64")


@dataclass
class ProvEnv:
    """A gridvmd in a namespace with a NAT network, using the test image store."""

    host: HostEnv
    net: str
    subnet: str

    def gridvm(self, *args: str, check: bool = True, input: str | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, GRIDVM_HOME=str(self.host.home), GRIDVM_IMAGES=str(TEST_IMAGES))
        proc = subprocess.run([sys.executable, "-m", "gridvm", *args], env=env, text=True,
                              capture_output=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"gridvm {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}")
        return proc

    def view(self, name: str) -> dict[str, Any]:
        views: list[dict[str, Any]] = json.loads(self.gridvm("list", name, "--json").stdout)
        return views[0]

    def exec(self, dom: str, *argv: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run argv in the guest through gridvmd's agent route: (code, stdout, stderr)."""
        c = self.host.agent.client()
        try:
            res = c.post(f"/domains/{dom}/guest-exec", {"argv": list(argv), "timeout": timeout},
                         timeout=timeout + 15)
        finally:
            c.close()
        return (int(res["returncode"]), base64.b64decode(res["stdout"]).decode(),
                base64.b64decode(res["stderr"]).decode())

    def sh(self, dom: str, script: str, timeout: float = 60) -> str:
        code, out, err = self.exec(dom, "/bin/sh", "-c", script, timeout=timeout)
        assert code == 0, f"{dom}: {script!r} failed ({code}): {err.strip()}"
        return out

    def wait_agent(self, dom: str, timeout: float = 240) -> float:
        """Seconds until the guest's agent runs commands (after the domain started)."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(GridvmError, AssertionError):
                if self.exec(dom, "/bin/true", timeout=10)[0] == 0:
                    return time.monotonic() - started
            time.sleep(1)
        tail = self.gridvm("dmesg", "-n", "30", dom, check=False).stdout
        raise AssertionError(f"{dom}: no guest agent within {timeout:.0f}s; console:\n{tail}")

    def wait_boot_done(self, dom: str, timeout: float = 240) -> None:
        """Until systemd has finished booting the guest (first-boot commands have run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, out, _ = self.exec(dom, "systemctl", "is-system-running", timeout=20)
            if out.strip() in ("running", "degraded"):
                return
            time.sleep(2)
        raise AssertionError(f"{dom}: systemd did not finish booting within {timeout:.0f}s")


@contextlib.contextmanager
def prov_env(tiny: ImageInfo, tmp: Path) -> Iterator[ProvEnv]:
    with host_env(tiny, tmp, TEST_IMAGES) as host:
        n = next(_nets)
        subnet = f"10.{150 + n % 40}.{os.getpid() % 250}"
        net = f"pnat{n}"
        env = ProvEnv(host, net, subnet)
        env.gridvm("network", "create", net, "--mode", "nat", "--subnet", f"{subnet}.0/24")
        try:
            yield env
        finally:
            with contextlib.suppress(Exception):
                host.agent.destroy_all()
            with contextlib.suppress(Exception):
                env.gridvm("network", "delete", net, check=False)
