"""Membership certificates, kept in etcd: the CA, join tokens, issued certificates, the CRL.

    pki/ca              {"cert", "key"}: the cluster CA (members only: etcd wants a client
                        certificate of this CA — as Proxmox keeps its CA key in /etc/pve)
    pki/tokens/<id>     {"digest", "expires", "role"}: a one-time join token (its secret's
                        SHA-256 only); consumed by a compare-and-delete transaction
    pki/certs/<name>    {"serial", "role", "address", "issued"}: the certificate in force
    pki/crl             {"pem", "serials"}: revoked serials and the signed CRL

A host, a witness (an etcd member only) and an administrator's client are all members of
some role; `revoke` puts a member's serial on the CRL, which every host reloads within a
heartbeat, so the member is refused by every TLS handshake from then on.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from gridvm.cluster.core import Cluster
from gridvm.cluster.etcd import Compare, delete_op, put_op
from gridvm.cluster.pki import (
    Ca,
    PkiError,
    new_token,
    serial_of,
    split_token,
    token_digest,
    token_matches,
)
from gridvm.config.model import HostRef, IpAddr
from gridvm.errors import Conflict, NotFound

Role = Literal["host", "witness", "admin"]
TOKEN_TTL_S = 24 * 3600


class EnrollRequest(BaseModel):
    token: str = Field(max_length=64)
    name: HostRef
    csr: str = Field(max_length=8192)
    address: IpAddr | None = None       # the member's listen address (its certificate's SAN)


class EnrollAnswer(BaseModel):
    cluster: str
    role: Role
    cert: str
    ca: str
    crl: str
    etcd: str                           # client URLs of etcd's members


def _key(*parts: str) -> str:
    return Cluster.key("pki", *parts)


def store_ca(cluster: Cluster, ca: Ca) -> None:
    """Keep the CA in etcd (once: a second init does not replace it)."""
    cluster.etcd.create(_key("ca"), _json({"cert": ca.cert.decode(), "key": ca.key.decode()}))


def load_ca(cluster: Cluster) -> Ca:
    data = cluster.etcd.get_json(_key("ca"))
    if not isinstance(data, dict):
        raise NotFound("this cluster has no CA in etcd (gridvm cluster init makes it)")
    return Ca(key=str(data["key"]).encode(), cert=str(data["cert"]).encode())


def create_token(cluster: Cluster, *, role: Role = "host", ttl_s: float = TOKEN_TTL_S,
                 now: float | None = None) -> str:
    """A new one-time join token, valid `ttl_s` seconds."""
    token = new_token()
    tid, secret = split_token(token)
    created = now if now is not None else time.time()
    cluster.etcd.put_json(_key("tokens", tid), {"digest": token_digest(secret), "role": role,
                                                "expires": created + ttl_s})
    return token


def consume_token(cluster: Cluster, token: str, *, now: float | None = None) -> Role:
    """Check a join token and use it up (atomically: two joiners cannot share one)."""
    tid, secret = split_token(token)
    key = _key("tokens", tid)
    kv = cluster.etcd.get(key)
    data: dict[str, Any] = kv.json() if kv else {}
    if kv is None or not token_matches(secret, str(data.get("digest", ""))):
        raise PkiError("unknown or already used join token (gridvm cluster token makes one)")
    if float(data.get("expires", 0)) < (now if now is not None else time.time()):
        cluster.etcd.delete(key)
        raise PkiError("this join token has expired (gridvm cluster token makes a new one)")
    if not cluster.etcd.txn([Compare(key, "MOD", kv.mod_revision)], [delete_op(key)]):
        raise PkiError("this join token was just used by another host")
    role = data.get("role", "host")
    return role if role in ("host", "witness", "admin") else "host"


def issue(cluster: Cluster, ca: Ca, name: str, csr: bytes, address: str | None,
          role: Role) -> bytes:
    """Sign a member's CSR and record its certificate (replacing a revoked or dead one)."""
    held = cluster.etcd.get_json(_key("certs", name))
    if isinstance(held, dict) and name in cluster.alive():
        raise Conflict(f"the name {name} belongs to a live host; remove it first "
                       "(gridvm host remove) or choose another name")
    cert = ca.sign(csr, name, [address] if address else [])
    record_cert(cluster, name, cert, address, role)
    return cert


def record_cert(cluster: Cluster, name: str, cert: bytes, address: str | None,
                role: Role) -> None:
    """Note the certificate in force for member `name` (what `revoke` revokes)."""
    cluster.etcd.put_json(_key("certs", name), {"serial": str(serial_of(cert)), "role": role,
                                                "address": address, "issued": time.time()})


def enroll(cluster: Cluster, req: EnrollRequest, etcd_urls: str) -> EnrollAnswer:
    """What a joiner gets for a valid token and CSR: its certificate, the CA and the CRL."""
    role = consume_token(cluster, req.token)
    ca = load_ca(cluster)
    cert = issue(cluster, ca, req.name, req.csr.encode(), req.address, role)
    info = cluster.info() or {}
    return EnrollAnswer(cluster=str(info.get("name", "gridvm")), role=role, cert=cert.decode(),
                        ca=ca.cert.decode(), crl=crl(cluster, ca), etcd=etcd_urls)


def crl(cluster: Cluster, ca: Ca | None = None) -> str:
    """The CRL in force (made, empty, the first time)."""
    data = cluster.etcd.get_json(_key("crl"))
    if isinstance(data, dict) and data.get("pem"):
        return str(data["pem"])
    pem = (ca or load_ca(cluster)).crl([]).decode()
    cluster.etcd.create(_key("crl"), _json({"pem": pem, "serials": []}))
    return str((cluster.etcd.get_json(_key("crl")) or {}).get("pem", pem))


def crl_revision(cluster: Cluster) -> int:
    kv = cluster.etcd.get(_key("crl"))
    return kv.mod_revision if kv else 0


def revoke(cluster: Cluster, name: str) -> int | None:
    """Revoke member `name`'s certificate (the serial revoked, or None if it had none)."""
    held = cluster.etcd.get_json(_key("certs", name))
    if not isinstance(held, dict):
        return None
    serial = int(held["serial"])
    ca = load_ca(cluster)
    for _ in range(10):                          # compare-and-swap against other revokers
        kv = cluster.etcd.get(_key("crl"))
        serials = [int(s) for s in (kv.json().get("serials", []) if kv else [])]
        if serial not in serials:
            serials.append(serial)
        value = _json({"pem": ca.crl(serials).decode(), "serials": [str(s) for s in serials]})
        ops = [put_op(_key("crl"), value), delete_op(_key("certs", name))]
        cond = [Compare(_key("crl"), "MOD", kv.mod_revision if kv else 0)]
        if cluster.etcd.txn(cond, ops):
            return serial
    raise Conflict("could not update the CRL (it kept changing); try again")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
