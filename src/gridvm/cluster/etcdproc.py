"""Run an etcd member as a detached child process with its own data directory.

With a TLS identity (`pki.Identity`: the member's key and certificate, the cluster CA) etcd
serves clients and peers over TLS and requires certificates of the cluster's CA from both
(`--client-cert-auth`, `--peer-client-cert-auth`): only members of the cluster can read or
write its state. A member is the first of a new cluster or joins an existing one
(`initial` = the full `--initial-cluster` list, `existing=True`) after `member add`.

Raft timers are shortened (heartbeat 100 ms, election timeout 500 ms): etcd's shortest lease
is 1.5 election timeouts, so 1 s leases become legal — the TTL of a VIP's election
(`ClusterConfig.vip_ttl`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.cluster.pki import Identity
from gridvm.errors import GridvmError
from gridvm.host import netns, procs

CLIENT_PORT = 2379
PEER_PORT = 2380
HEARTBEAT_MS = 100
ELECTION_MS = 500


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def client_url(address: str, *, tls: bool = True) -> str:
    return f"{'https' if tls else 'http'}://{_host(address)}:{CLIENT_PORT}"


def peer_url(address: str, *, tls: bool = True) -> str:
    return f"{'https' if tls else 'http'}://{_host(address)}:{PEER_PORT}"


def start(data_dir: Path, address: str, *, ns: str | None = None,
          tls: Identity | None = None, name: str = "gridvm", initial: str | None = None,
          existing: bool = False, timeout: float = 20) -> int:
    """Start an etcd member listening on `address` (inside namespace `ns`); its pid once it
    answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    secure = tls is not None
    peer = peer_url(address, tls=secure)
    client = client_url(address, tls=secure)
    argv = [*netns.exec_prefix(ns), "etcd", "--name", name,
            "--data-dir", str(data_dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial or f"{name}={peer}",
            "--initial-cluster-state", "existing" if existing else "new",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS)]
    if tls is not None:
        for side in ("", "peer-"):
            argv += [f"--{side}cert-file", str(tls.cert), f"--{side}key-file", str(tls.key),
                     f"--{side}trusted-ca-file", str(tls.ca), f"--{side}client-cert-auth"]
        if tls.crl.exists():
            argv += ["--client-crl-file", str(tls.crl)]
    with open(data_dir / "etcd.log", "ab") as out:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        except FileNotFoundError as exc:
            raise GridvmError("etcd is not installed (apt-get install etcd-server)") from exc
    (data_dir / "etcd.pid").write_text(f"{proc.pid}\n")
    etcd = Etcd(client, timeout=1, tls=tls.client_context() if tls else None)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (data_dir / "etcd.log").read_text(errors="replace").strip()[-300:]
                raise GridvmError(f"etcd exited at start: {tail}")
            with contextlib.suppress(EtcdError):
                if ns:
                    netns.call_in(ns, lambda: etcd.get("/gridvm/cluster"))
                else:
                    etcd.get("/gridvm/cluster")
                return proc.pid
            time.sleep(0.1)
    finally:
        etcd.close()
    stop(data_dir)
    raise GridvmError(f"etcd did not answer on {client} within {timeout:.0f}s")


def running(data_dir: Path) -> int | None:
    """The pid of the etcd started with `data_dir`, if it runs."""
    pid = procs.read_pidfile(data_dir / "etcd.pid")
    if pid is not None and procs.pid_alive(pid) and any(
            "etcd" in a for a in procs.cmdline(pid)):
        return pid
    return None


def stop(data_dir: Path) -> None:
    pid = running(data_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while procs.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    (data_dir / "etcd.pid").unlink(missing_ok=True)
