"""Hosts that share nothing but the network, in a lab: each lab host is a separate machine
(its own network and mount namespaces), a cluster is made the way an administrator makes one
on real machines (`cluster init` on the first, `cluster join ADDR --token --ca-hash` on the
next, run on each machine itself), and every host-to-host call goes over mutual TLS."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from netlab import LabEnv, lab_env

from gridvm.cluster.etcd import Etcd
from gridvm.cluster.pki import Ca, Identity
from gridvm.host import netns
from gridvm.images.store import ImageInfo

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def lab(tiny_image: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    with lab_env(tiny_image, tmp_path_factory.mktemp("seplab")) as env:
        yield env


def on(lab: LabEnv, host: str, *argv: str, check: bool = True
       ) -> subprocess.CompletedProcess[str]:
    """Run a command on a lab machine (its namespaces, its home), as its administrator."""
    proc = lab.gridvm("lab", "exec", host, "--name", lab.name, "--", *argv, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{host}: {' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def gridvm_on(lab: LabEnv, host: str, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
    return on(lab, host, sys.executable, "-m", "gridvm", *args, check=check)


def home(lab: LabEnv, host: str) -> Path:
    return Path(lab.state.host(host).home)


def test_no_host_sees_another_hosts_files(lab: LabEnv) -> None:
    probe = ("import os, socket, sys\n"
             "mine, theirs, shared = sys.argv[1:4]\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(theirs + '/gridvmd.sock'); print('sock: open')\n"
             "except OSError as e: print('sock:', e.strerror)\n"
             "print('home:', os.path.exists(theirs), 'key:', "
             "os.path.exists(theirs + '/pki/host.key'))\n"
             "print('mine:', os.path.exists(mine + '/gridvmd.sock'), 'shared:', "
             "os.path.isdir(shared))\n")
    shared = str(Path(lab.state.root) / "shared")
    for me, other in (("h1", "h2"), ("h2", "h1")):
        out = on(lab, me, sys.executable, "-c", probe, str(home(lab, me)),
                 str(home(lab, other)), shared).stdout.split("\n")
        assert out[0] == "sock: No such file or directory", out
        assert out[1] == "home: False key: False", out
        assert out[2] == "mine: True shared: True", out
    # The lab's own secrets (its CA) are out of every machine's sight too.
    ca_key = Path(lab.state.root) / "pki" / "ca.key"
    assert ca_key.exists()
    assert on(lab, "h1", "test", "-e", str(ca_key), check=False).returncode == 1


def test_init_and_join_with_a_token_as_on_real_machines(lab: LabEnv, tmp_path: Path) -> None:
    a1, a2 = lab.addr("h1"), lab.addr("h2")
    init = json.loads(gridvm_on(lab, "h1", "cluster", "init", "--cluster-name", "fg",
                                "--name", "h1", "--ttl", "3", "--json").stdout)
    assert init["server"] == f"{a1}:8002" and init["etcd"] == f"https://{a1}:2379"
    token, ca_hash = init["token"], init["ca_hash"]

    # Wrong pins and bad tokens: refused, and h2 keeps no trace of a cluster.
    bad_hash = "sha256:" + "0" * 64
    err = gridvm_on(lab, "h2", "cluster", "join", a1, "--token", token, "--ca-hash",
                    bad_hash, check=False).stderr
    assert "does not have the hash given" in err
    err = gridvm_on(lab, "h2", "cluster", "join", a1, "--token", "abcdef.0123456789abcdef",
                    "--ca-hash", ca_hash, check=False).stderr
    assert "unknown or already used join token" in err
    assert not (home(lab, "h2") / "cluster" / "config.json").exists()

    gridvm_on(lab, "h2", "cluster", "join", a1, "--token", token, "--ca-hash", ca_hash,
              "--name", "h2", "--ttl", "3")
    assert (home(lab, "h2") / "pki" / "host.key").stat().st_mode & 0o077 == 0
    err = gridvm_on(lab, "h2", "cluster", "join", a1, "--token", token, "--ca-hash", ca_hash,
                    check=False).stderr
    assert "already in the cluster" in err
    hosts = {h["name"]: h for h in json.loads(
        gridvm_on(lab, "h1", "host", "list", "--json").stdout)}
    assert {n: h["state"] for n, h in hosts.items()} == {"h1": "up", "h2": "up"}

    # A domain made on h1 for h2 runs there, and h1 reaches its console over the network.
    cfg = lab.write_cfg("sep1", "bridge=xenbr0",
                        f'ip = "{lab.guest_ip(40)}"\nnetmask = "255.255.255.0"')
    shared_cfg = Path(lab.state.root) / "shared" / "sep1.cfg"    # the machines see this
    shared_cfg.write_text(cfg.read_text())
    gridvm_on(lab, "h1", "create", str(shared_cfg), "--host", "h2")
    assert lab.wait_http(lab.guest_ip(40)) == "sep1"
    out = on(lab, "h1", "sh", "-c", f"echo uname -n | {sys.executable} -m gridvm console sep1")
    assert "sep1" in out.stdout

    # The registry names hosts by URL; no path of any host is in etcd.
    ident = Identity(home(lab, "h1") / "pki")

    def dump() -> list[tuple[str, str]]:
        etcd = Etcd(init["etcd"], timeout=3, tls=ident.client_context())
        try:
            return [(kv.key, kv.value) for kv in etcd.range("/gridvm/")]
        finally:
            etcd.close()

    kvs = netns.call_in(lab.ns("h1"), dump)
    urls = {k: json.loads(v)["url"] for k, v in kvs if k.startswith("/gridvm/hosts/")}
    assert urls == {"/gridvm/hosts/h1": f"https://{a1}:8002",
                    "/gridvm/hosts/h2": f"https://{a2}:8002"}
    paths = [str(home(lab, h)) for h in ("h1", "h2")] + ["gridvmd.sock", "/run/gridvm"]
    leaks = [(k, p) for k, v in kvs for p in paths if p in v]
    assert leaks == [], leaks

    # Mutual TLS: no certificate, another CA's, a forged one with a host's name — refused
    # by the handshake, and nothing changed.
    other = Ca.create("other")
    forged = Identity(tmp_path / "forged")
    key, cert = other.issue("h2", [a2])
    forged.save(key, cert, ident.ca.read_bytes())
    no_cert = ssl.create_default_context(cafile=str(ident.ca))
    no_cert.check_hostname = False
    before = views_on(lab)
    for ctx in (no_cert, forged.client_context()):
        assert answer(lab, f"https://{a1}:8002/v1/domains", ctx) is None
        assert answer(lab, f"https://{a1}:8002/v1/domains/sep1/destroy", ctx, "POST") is None
    assert answer(lab, f"https://{a1}:8002/v1/info", ident.client_context()) == 200
    assert views_on(lab) == before
    gridvm_on(lab, "h1", "destroy", "sep1")


def views_on(lab: LabEnv) -> list[tuple[str, str]]:
    out = gridvm_on(lab, "h1", "list", "--json").stdout
    return sorted((v["name"], v["state"]) for v in json.loads(out))


def answer(lab: LabEnv, url: str, ctx: ssl.SSLContext, method: str = "GET") -> Any:
    """The status a request gets from the client namespace, or None if TLS refused it."""
    def call() -> int | None:
        try:
            with httpx.Client(verify=ctx, timeout=5) as c:
                return c.request(method, url).status_code
        except httpx.HTTPError:
            return None
    return netns.call_in(lab.ns("client"), call)
