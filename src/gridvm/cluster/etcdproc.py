"""Run a single-member etcd as a detached child process with its own data directory.

Its Raft timers are shortened (heartbeat 100 ms, election timeout 500 ms; a single member
never holds an election against peers): etcd's shortest lease is 1.5 election timeouts, so
1 s leases become legal — the TTL of a VIP's election (`ClusterConfig.vip_ttl`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.errors import GridvmError
from gridvm.host import netns, procs

CLIENT_PORT = 2379
PEER_PORT = 2380
HEARTBEAT_MS = 100
ELECTION_MS = 500


def client_url(address: str) -> str:
    return f"http://{address}:{CLIENT_PORT}"


def start(data_dir: Path, address: str, *, ns: str | None = None,
          timeout: float = 20) -> int:
    """Start etcd listening on `address` (inside namespace `ns`); its pid once it answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    peer = f"http://{address}:{PEER_PORT}"
    argv = [*netns.exec_prefix(ns), "etcd", "--name", "gridvm",
            "--data-dir", str(data_dir / "data"),
            "--listen-client-urls", client_url(address),
            "--advertise-client-urls", client_url(address),
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"gridvm={peer}",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS)]
    with open(data_dir / "etcd.log", "ab") as out:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        except FileNotFoundError as exc:
            raise GridvmError("etcd is not installed (apt-get install etcd-server)") from exc
    (data_dir / "etcd.pid").write_text(f"{proc.pid}\n")
    etcd = Etcd(client_url(address), timeout=1)
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
    raise GridvmError(f"etcd did not answer on {client_url(address)} within {timeout:.0f}s")


def stop(data_dir: Path) -> None:
    pid = procs.read_pidfile(data_dir / "etcd.pid")
    if pid is not None and procs.pid_alive(pid) and any(
            "etcd" in a for a in procs.cmdline(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while procs.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    (data_dir / "etcd.pid").unlink(missing_ok=True)
