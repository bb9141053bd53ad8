"""The cluster's certificates: one CA per cluster, a key and certificate per host, a CRL.

`gridvm cluster init` makes the CA (EC P-256, `cryptography`); every member — host, witness,
the administrators' CLI — gets a certificate signed by it. The same certificates serve
the hosts' HTTPS API (mutual TLS: a peer must present a certificate of this cluster that
is not revoked) and etcd's client and peer TLS. A joining host makes its own key and sends
a CSR; its private key never leaves it. The joiner checks the server it enrolls with by the
CA's public-key hash (`sha256:<hex>` of the SubjectPublicKeyInfo, as `kubeadm join
--discovery-token-ca-cert-hash` does). Join tokens are kubeadm-shaped `[a-z0-9]{6}.[a-z0-9]{16}`:
the first part names the token, the second is its secret (only its hash is stored).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gridvm.errors import ConfigError, GridvmError

TOKEN_RE = re.compile(r"([a-z0-9]{6})\.([a-z0-9]{16})")
CA_YEARS = 10
CERT_DAYS = 3650
ORG = "gridvm"


class PkiError(GridvmError):
    """A certificate, key, CSR or token is malformed or does not check out."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the cluster's keys are EC P-256 keys")
    return key


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from None


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Ca:
    """The cluster CA: its key (kept in etcd, readable by members only) and certificate."""

    key: bytes
    cert: bytes

    @classmethod
    def create(cls, cluster: str) -> Ca:
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"gridvm cluster {cluster}")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key=key_pem(key), cert=cert_pem(cert))

    @property
    def hash(self) -> str:
        return spki_hash(self.cert)

    def sign(self, csr_pem: bytes, name: str, addresses: list[str],
             days: int = CERT_DAYS) -> bytes:
        """A certificate for `name` (CN) with `addresses` as IP subject alternative names,
        for both TLS server and client use, from the requester's CSR."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise PkiError("the certificate request's signature does not check out")
        ca_key, ca_cert = _load_key(self.key), load_cert(self.cert)
        try:
            ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        except ValueError as exc:
            raise ConfigError(f"invalid address for a certificate: {exc}") from None
        sans: list[x509.GeneralName] = [x509.DNSName(name), *ips]
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                                         x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_cert.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert_pem(cert)

    def issue(self, name: str, addresses: list[str]) -> tuple[bytes, bytes]:
        """A new key and its certificate, for members made on the CA's side (etcd, the
        administrators' client certificate)."""
        key, csr = make_csr(name)
        return key, self.sign(csr, name, addresses)

    def crl(self, revoked: list[int]) -> bytes:
        """A CRL listing `revoked` serial numbers (valid for a year, re-signed on change)."""
        ca_key, ca_cert = _load_key(self.key), load_cert(self.cert)
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=365)))
        for serial in sorted(set(revoked)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=5)).build())
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_csr(name: str) -> tuple[bytes, bytes]:
    """A new private key and a certificate request for `name`: (key PEM, CSR PEM)."""
    key = _key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def spki_hash(cert: bytes) -> str:
    """`sha256:<hex>` of a certificate's public key (kubeadm's CA pin)."""
    spki = load_cert(cert).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def serial_of(cert: bytes) -> int:
    return int(load_cert(cert).serial_number)


def common_name(cert: bytes) -> str:
    attrs = load_cert(cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def check_issued_by(cert: bytes, ca_cert: bytes) -> None:
    """Raise unless `cert` is signed by `ca_cert`."""
    try:
        load_cert(cert).verify_directly_issued_by(load_cert(ca_cert))
    except (ValueError, TypeError) as exc:
        raise PkiError(f"certificate not issued by this cluster's CA: {exc}") from None


# ----- join tokens -------------------------------------------------------------------------


def new_token() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

    def part(n: int) -> str:
        return "".join(secrets.choice(alphabet) for _ in range(n))

    return f"{part(6)}.{part(16)}"


def split_token(token: str) -> tuple[str, str]:
    """(token id, secret); ConfigError if it is not `xxxxxx.yyyyyyyyyyyyyyyy`."""
    m = TOKEN_RE.fullmatch(token.strip())
    if not m:
        raise ConfigError("invalid join token (expected the form abcdef.0123456789abcdef)")
    return m[1], m[2]


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(token_digest(secret), digest)


# ----- TLS contexts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A member's files: its key and certificate, the CA, and the CRL in force."""

    dir: Path

    @property
    def key(self) -> Path:
        return self.dir / "host.key"

    @property
    def cert(self) -> Path:
        return self.dir / "host.crt"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    def exists(self) -> bool:
        return self.key.exists() and self.cert.exists() and self.ca.exists()

    def save(self, key: bytes, cert: bytes, ca: bytes, crl: bytes | None = None) -> None:
        """Write the files (key 0600), each atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path, data, mode in ((self.key, key, 0o600), (self.cert, cert, 0o644),
                                 (self.ca, ca, 0o644)):
            _write(path, data, mode)
        if crl is not None:
            _write(self.crl, crl, 0o644)

    def save_crl(self, crl: bytes) -> None:
        _write(self.crl, crl, 0o644)

    def name(self) -> str:
        return common_name(self.cert.read_bytes())

    def server_context(self) -> ssl.SSLContext:
        """TLS for a listener that requires a valid, unrevoked client certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        self._trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """TLS for calling another member: present our certificate, trust only the CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        self._trust(ctx)
        return ctx

    def _trust(self, ctx: ssl.SSLContext) -> None:
        ctx.load_verify_locations(cafile=str(self.ca))
        if self.crl.exists():
            ctx.load_verify_locations(cafile=str(self.crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)
