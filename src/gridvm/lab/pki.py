"""A lab's certificates: the lab plays the administrator who holds the cluster CA.

`<lab root>/pki/` keeps the CA (`ca.crt`, `ca.key`) and the administrator's client identity
(`admin/`); every host gets its own key and certificate (SAN: its LAN address) in its home's
`pki/` before its gridvmd starts, and the lab's etcd gets one in `<root>/etcd/pki/`. The CLI
reaches a lab host over HTTPS at its LAN address, from the lab's client namespace, with the
administrator's certificate.
"""

from __future__ import annotations

from pathlib import Path

from gridvm.api.client import Client
from gridvm.api.hostpeer import api_url
from gridvm.cluster.pki import Ca, Identity


def _dir(root: Path) -> Path:
    return root / "pki"


def make_ca(root: Path, lab: str) -> Ca:
    """The lab's CA (made once, kept in the lab root)."""
    d = _dir(root)
    if (d / "ca.crt").exists():
        return load_ca(root)
    ca = Ca.create(lab)
    ident = Identity(d / "admin")
    key, cert = ca.issue(f"admin-{lab}", [])
    ident.save(key, cert, ca.cert, ca.crl([]))
    (d / "ca.key").write_bytes(ca.key)
    (d / "ca.key").chmod(0o600)
    (d / "ca.crt").write_bytes(ca.cert)
    return ca


def load_ca(root: Path) -> Ca:
    d = _dir(root)
    return Ca(key=(d / "ca.key").read_bytes(), cert=(d / "ca.crt").read_bytes())


def admin(root: Path) -> Identity:
    return Identity(_dir(root) / "admin")


def provision(ca: Ca, ident: Identity, name: str, address: str) -> None:
    """Give a member (host or etcd) its key and certificate, unless it has them."""
    if ident.exists():
        return
    key, cert = ca.issue(name, [address])
    ident.save(key, cert, ca.cert, ca.crl([]))


def client(root: Path, address: str, ns: str, timeout: float = 120) -> Client:
    """The administrator's client for the gridvmd at `address`, from namespace `ns`."""
    return Client.remote(api_url(address), admin(root).client_context(), ns=ns,
                         timeout=timeout)
