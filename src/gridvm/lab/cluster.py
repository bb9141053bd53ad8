"""A lab cluster and the faults to rehearse with.

`gridvm lab up --cluster` runs etcd (TLS, client certificates of the lab's CA) in its own
namespace `<lab>-etcd` on the LAN (address .3) — an external etcd, as kubeadm calls it —
keeps the CA there as `gridvm cluster init` does, and joins every host with the certificate
the lab gave it. Shared storage: the lab's `shared/` directory (under its root)
is at the same path in every host namespace (network namespaces share the filesystem), so a
domain restarted elsewhere finds its disks there.

Faults: `poweroff` (the host's LAN port goes down and every process in its namespace —
gridvmd, watchdog, QEMUs — is SIGKILLed at once), `poweron` (port up, gridvmd restarted:
it rejoins the cluster), `partition` / `heal` (the host's LAN port down / up: it loses the
LAN and etcd while everything on it keeps running).
"""

from __future__ import annotations

from pathlib import Path

from gridvm.cluster import enroll, etcdproc, membership
from gridvm.cluster.core import Cluster
from gridvm.cluster.etcd import Etcd
from gridvm.cluster.pki import Identity
from gridvm.cluster.settings import Files
from gridvm.errors import Conflict
from gridvm.host import netdevs, netns
from gridvm.lab import lab, machine, pki
from gridvm.paths import Home


def etcd_url(state: lab.LabState) -> str:
    if state.etcd is None:
        raise Conflict(f"lab {state.name} has no cluster (gridvm lab up --cluster)")
    return etcdproc.client_url(state.etcd.address.split("/")[0])


def start_cluster(state: lab.LabState) -> None:
    """Start etcd in the lab's etcd namespace, set up the cluster there, join every host."""
    assert state.etcd is not None
    root = Path(state.root)
    ca = pki.load_ca(root)
    address = state.etcd.address.split("/")[0]
    ident = Identity(root / "etcd" / "pki")
    pki.provision(ca, ident, "etcd", address)
    url = etcd_url(state)
    etcdproc.start(root / "etcd", address, ns=state.etcd.ns, tls=ident)

    def setup() -> None:
        cluster = Cluster(Etcd(url, timeout=3, tls=pki.admin(root).client_context()))
        try:
            membership.first_setup(cluster, state.name, ca)
            for h in state.hosts:
                cert = Files(Home(Path(h.home))).identity.cert.read_bytes()
                enroll.record_cert(cluster, h.name, cert, h.address.split("/")[0], "host")
        finally:
            cluster.etcd.close()

    netns.call_in(state.etcd.ns, setup)
    for h in state.hosts:
        with lab._client(state, h) as c:
            c.post("/cluster/join", {"etcd": url, "host": h.name, "ttl": state.ttl,
                                     "margin": state.margin})


def _port(state: lab.LabState, host: str, up: bool) -> None:
    port = state.host(host).name
    netns.call_in(state.lan_ns, lambda: (netdevs.set_up if up else netdevs.set_down)(port))


def partition(state: lab.LabState, host: str) -> None:
    _port(state, host, up=False)


def heal(state: lab.LabState, host: str) -> None:
    _port(state, host, up=True)


def poweroff(state: lab.LabState, host: str) -> None:
    """Pull the plug: cut the host's link and kill everything in its namespace at once."""
    h = state.host(host)
    _port(state, host, up=False)
    lab._kill_namespace(h.ns)
    machine.remove(h.ns)          # a machine powered back on has empty /tmp and /run
    h.pid = None
    lab.save(state)


def poweron(state: lab.LabState, host: str) -> None:
    """Reconnect a powered-off host and start its gridvmd (it rejoins the cluster)."""
    h = state.host(host)
    _port(state, host, up=True)
    h.pid = lab._start_host(state, h, network=False)
    lab.save(state)
