"""The web console's TLS certificate.

`certificate(home)` gives the (cert, key) files the TLS server uses. Until hosts have
certificates from a cluster CA, a host makes itself a self-signed one (EC P-256, the host's
names and addresses as subject alternative names, 2 years) under `home/web/` and keeps it;
a cluster CA's files placed at the same paths (`web/cert.pem`, `web/key.pem`) replace it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gridvm.paths import Home

VALID_DAYS = 730


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    self_signed: bool

    def fingerprint(self) -> str:
        """SHA-256 fingerprint of the certificate (to check in a browser's warning)."""
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def cert_dir(home: Home) -> Path:
    return home.root / "web"


def certificate(home: Home, addresses: list[str]) -> CertFiles:
    """The certificate to serve: the one in `home/web/` if present, else a new self-signed
    one for this host's name and `addresses`."""
    d = cert_dir(home)
    cert, key = d / "cert.pem", d / "key.pem"
    if cert.is_file() and key.is_file():
        issuer = x509.load_pem_x509_certificate(cert.read_bytes())
        return CertFiles(cert, key, issuer.issuer == issuer.subject)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem_cert, pem_key = self_signed(socket.gethostname(), addresses)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem_key)
    cert.write_bytes(pem_cert)
    return CertFiles(cert, key, True)


def self_signed(hostname: str, addresses: list[str]) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) and its key (PEM) for `hostname` and `addresses`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gridvm {hostname}")])
    alt: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    for a in {*addresses, "127.0.0.1", "::1"}:
        alt.append(x509.IPAddress(ipaddress.ip_address(a)))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
