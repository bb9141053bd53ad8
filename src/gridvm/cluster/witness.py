"""The witness: a third etcd member on a small box that runs no guests (FermiGrid's shape:
two hosts and a witness). With etcd members on both hosts and the witness, either host — or
the witness — may be lost and the other two still hold quorum; two hosts alone cannot tell a
dead peer from a cut link, so they refuse to act (each fences itself when it loses quorum).

`gridvm cluster witness SERVER --token T --ca-hash H --listen ADDR` enrols with a one-time
token (made by `gridvm cluster token --witness`), adds an etcd member on ADDR to the cluster
and starts it, then leaves a keeper running (`python -m gridvm.cluster.witness --dir DIR`):
it restarts the member if it dies and keeps the member's CRL current, so a revoked host is
refused by the witness too.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gridvm.cluster import enroll, etcdproc, membership
from gridvm.cluster.core import Cluster
from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.cluster.pki import Identity
from gridvm.errors import Conflict, GridvmError
from gridvm.host import procs

log = logging.getLogger("gridvm.witness")

KEEP_S = 2.0


class Witness:
    """A witness's files under `dir`: pki/, etcd/, witness.json, keeper.pid, keeper.log."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.identity = Identity(dir / "pki")
        self.etcd_dir = dir / "etcd"
        self.state = dir / "witness.json"
        self.pid = dir / "keeper.pid"

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state.read_text())
        return data

    def keeper(self) -> int | None:
        pid = procs.read_pidfile(self.pid)
        if pid is not None and procs.pid_alive(pid) and \
                "gridvm.cluster.witness" in " ".join(procs.cmdline(pid)):
            return pid
        return None


def enlist(dir: Path, server: str, token: str, ca_hash: str, address: str,
           name: str) -> dict[str, Any]:
    """Enrol as a witness, add and start our etcd member, start the keeper."""
    w = Witness(dir)
    if w.state.exists():                 # set up before (e.g. the box rebooted): run it
        state = w.load()
        start_keeper(w)
        return {**state, "started": True}
    dir.mkdir(parents=True, exist_ok=True)
    key, ans = membership.enroll_with(server, token, ca_hash, name, address)
    if ans.role != "witness":
        raise Conflict("this token is for a host (gridvm cluster token --witness makes one "
                       "for a witness)")
    w.identity.save(key, ans.cert.encode(), ans.ca.encode(), ans.crl.encode())
    cluster = Cluster(Etcd(ans.etcd, timeout=5, tls=w.identity.client_context()))
    try:
        initial = membership.add_member(cluster, name, address)
    finally:
        cluster.etcd.close()
    etcdproc.start(w.etcd_dir, address, tls=w.identity, name=name, initial=initial,
                   existing=True)
    state = {"cluster": ans.cluster, "name": name, "address": address,
             "etcd": etcdproc.client_url(address)}
    w.state.write_text(json.dumps(state, indent=2) + "\n")
    start_keeper(w)
    return state


def start_keeper(w: Witness) -> int:
    if (pid := w.keeper()) is not None:
        return pid
    with open(w.dir / "keeper.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gridvm.cluster.witness", "--dir",
                                 str(w.dir)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    w.pid.write_text(f"{proc.pid}\n")
    return proc.pid


def keep(w: Witness) -> None:
    """Forever: restart the member if it died; keep its CRL file current."""
    state = w.load()
    crl_rev = -1
    while True:
        try:
            if etcdproc.running(w.etcd_dir) is None:
                log.warning("etcd member not running: starting it")
                etcdproc.start(w.etcd_dir, state["address"], tls=w.identity,
                               name=state["name"], existing=True)
            cluster = Cluster(Etcd(state["etcd"], timeout=2, tls=w.identity.client_context()))
            try:
                rev = enroll.crl_revision(cluster)
                if rev and rev != crl_rev:
                    w.identity.save_crl(enroll.crl(cluster).encode())
                    crl_rev = rev
            finally:
                cluster.etcd.close()
        except (EtcdError, GridvmError, OSError) as exc:
            log.debug("witness: %s", exc)
        time.sleep(KEEP_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gridvm.cluster.witness")
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    keep(Witness(Path(args.dir)))


if __name__ == "__main__":
    main()
