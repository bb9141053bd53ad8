"""Becoming a member: `cluster init` (a CA, etcd with TLS, the first host) and `cluster
join` (a one-time token and the CA's hash, kubeadm style; or a host that was given its
certificate already, like a lab's hosts).

The joiner fetches the CA from the server's enrolment port (TLS not yet verifiable) and
accepts it only if its public-key hash is the one the administrator copied from `cluster
init`/`cluster token`; it then sends its token and CSR over TLS verified against that CA.
Its private key never leaves it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from gridvm.cluster import enroll, etcdproc
from gridvm.cluster.core import Cluster
from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.cluster.pki import Ca, Identity, PkiError, make_csr, spki_hash
from gridvm.cluster.settings import EtcdUrls, Files
from gridvm.config.model import HostRef, Text
from gridvm.errors import ConfigError, Conflict, GridvmError, PeerUnreachable
from gridvm.netaddr import host_port, parse_hostport

ENROLL_TIMEOUT_S = 15.0
API_PORT = 8002          # gridvmd's HTTPS API; enrolment is served on the next port


class Settings(BaseModel):
    """A host's cluster settings given at init or join."""

    host: HostRef | None = None                  # default: this machine's node name
    ttl: int = Field(default=5, ge=2, le=60)
    margin: float = Field(default=1.0, ge=0, le=600)
    capacity_mb: int | None = Field(default=None, ge=1)
    cpu_ratio: float = Field(default=4.0, gt=0, le=64)
    fence_command: Text | None = None

    def host_name(self) -> str:
        return self.host or os.uname().nodename.split(".")[0]


class InitRequest(Settings):
    cluster: HostRef = "gridvm"                  # the cluster's name
    etcd: EtcdUrls | None = None                 # an external etcd's URLs (else: our own)
    ca_cert: str | None = Field(default=None, max_length=8192)   # an existing CA (PEM)
    ca_key: str | None = Field(default=None, max_length=8192)


class JoinRequest(Settings):
    server: str | None = Field(default=None, max_length=300)   # a member's ADDR[:PORT]
    token: str | None = Field(default=None, max_length=64)
    ca_hash: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    etcd: EtcdUrls | None = None     # with a certificate given beforehand: etcd's URLs
    etcd_member: bool = False        # also run an etcd member on this host
    witness: bool = False            # only an etcd member (no gridvmd duties)


def enroll_with(server: str, token: str, ca_hash: str, name: str,
                address: str | None) -> tuple[bytes, enroll.EnrollAnswer]:
    """Get a certificate from a member's enrolment port: (our key, its answer)."""
    host, port = _split(server)
    base = f"https://{host_port(host, port + 1)}"
    try:
        with httpx.Client(base_url=base, verify=False, timeout=ENROLL_TIMEOUT_S) as c:
            ca_pem = c.get("/v1/pki/ca").raise_for_status().json()["ca"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise PeerUnreachable(f"cannot get the cluster CA from {base}: {exc}") from exc
    if spki_hash(ca_pem.encode()) != ca_hash:
        raise PkiError(f"the CA served by {server} does not have the hash given "
                       f"({ca_hash}); refusing to join")
    key, csr = make_csr(name)
    ca_file = _tmp_pem(ca_pem.encode())
    try:
        ctx = httpx.create_ssl_context(verify=str(ca_file))
        with httpx.Client(base_url=base, verify=ctx, timeout=ENROLL_TIMEOUT_S) as c:
            r = c.post("/v1/pki/enroll", json={"token": token, "name": name,
                                               "csr": csr.decode(), "address": address})
    except httpx.HTTPError as exc:
        raise PeerUnreachable(f"enrolment at {base} failed: {exc}") from exc
    finally:
        ca_file.unlink(missing_ok=True)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code >= 400:
        raise PkiError(f"{server} refused to enrol {name}: "
                       f"{body.get('error', r.text[:200]) if isinstance(body, dict) else ''}")
    return key, enroll.EnrollAnswer.model_validate(body)


def _split(server: str) -> tuple[str, int]:
    try:
        return parse_hostport(server, API_PORT)
    except ConfigError:
        raise ConfigError(f"invalid server {server!r}: use a member's ADDR[:PORT]") from None


def _tmp_pem(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(prefix="gridvm-ca-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def make_ca(req: InitRequest) -> Ca:
    """The CA given with the request, or a new one."""
    if req.ca_cert and req.ca_key:
        return Ca(key=req.ca_key.encode(), cert=req.ca_cert.encode())
    if req.ca_cert or req.ca_key:
        raise ConfigError("give both the CA's certificate and key, or neither")
    return Ca.create(req.cluster)


def own_identity(ident: Identity, ca: Ca, name: str, address: str | None) -> None:
    """Issue this host's certificate with the CA we hold."""
    key, cert = ca.issue(name, [address] if address else [])
    ident.save(key, cert, ca.cert, ca.crl([]))


def start_own_etcd(data_dir: Path, ident: Identity, address: str, *, name: str,
                   initial: str | None = None, existing: bool = False) -> str:
    """Run an etcd member with this host's certificate; its client URL."""
    if etcdproc.running(data_dir) is None:
        etcdproc.start(data_dir, address, tls=ident, name=name, initial=initial,
                       existing=existing)
    return etcdproc.client_url(address)


def stop_own_etcd(data_dir: Path) -> None:
    """Stop the etcd member this host runs and drop its data (a failed init)."""
    etcdproc.stop(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)


def become_etcd_member(files: Files, urls: str, name: str, address: str) -> str:
    """Add an etcd member on this host to the cluster and start it; the client URLs with
    ours first."""
    ident = files.identity
    own = etcdproc.client_url(address)
    if etcdproc.running(files.etcd_dir) is None:
        cluster = Cluster(files.etcd(urls, timeout=5))
        try:
            initial = add_member(cluster, name, address)
        finally:
            cluster.etcd.close()
        etcdproc.start(files.etcd_dir, address, tls=ident, name=name, initial=initial,
                       existing=True)
    others = [u for u in urls.split(",") if u and u != own]
    return ",".join([own, *others])


def add_member(cluster: Cluster, name: str, address: str, *, wait: float = 20) -> str:
    """Add an etcd member at `address` (to be started next); the --initial-cluster list.
    etcd refuses while a member started lately is not yet counted as active: retry."""
    deadline = time.monotonic() + wait
    while True:
        try:
            members = cluster.etcd.member_add(etcdproc.peer_url(address))
            break
        except EtcdError as exc:
            if "unhealthy cluster" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    parts = []
    for m in members:
        urls = m.get("peerURLs") or []
        member = m.get("name") or (name if etcdproc.peer_url(address) in urls else "")
        if member and urls:
            parts.append(f"{member}={urls[0]}")
    return ",".join(parts)


def first_setup(cluster: Cluster, name: str, ca: Ca) -> dict[str, object]:
    """Mark etcd as this cluster's and keep its CA and an empty CRL there."""
    info = cluster.init(name)
    if str(info.get("name")) != name:
        raise Conflict(f"this etcd already holds cluster {info.get('name')!r}")
    enroll.store_ca(cluster, ca)
    held = enroll.load_ca(cluster)
    if held.hash != ca.hash:
        raise Conflict("this etcd already holds another CA for the cluster")
    enroll.crl(cluster, ca)
    return info


def check_etcd(etcd: Etcd) -> None:
    try:
        etcd.get("/gridvm/cluster")
    except GridvmError as exc:
        raise PeerUnreachable(f"cannot reach etcd at {etcd.url}: {exc}") from exc
