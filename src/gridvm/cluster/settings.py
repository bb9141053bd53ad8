"""A host's cluster settings and the files its gridvmd and watchdog share in the home.

    <home>/cluster/config.json    ClusterConfig (present while the host is in a cluster)
    <home>/cluster/lease          the host lease id, written by the watchdog on each grant
    <home>/cluster/fenced         present while the host is fenced (written before killing)
    <home>/cluster/ha/<domid>     one per running HA domain: what the watchdog kills
    <home>/cluster/watchdog.pid
    <home>/etcd/                 the etcd member this host runs (cluster init, join --etcd-member)
    <home>/pki/                  the host's key and certificate, the CA, the CRL (pki.Identity)
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

from gridvm.cluster.etcd import Etcd
from gridvm.cluster.pki import Identity
from gridvm.config.model import HostRef, Text
from gridvm.paths import Home


def _etcd_urls(v: str) -> str:
    if not v.strip(","):
        raise ValueError("no etcd URL given")
    for one in v.split(","):
        check_url(one, "etcd", "https://10.0.0.3:2379")
    return v


EtcdUrls = Annotated[str, AfterValidator(_etcd_urls)]


class ClusterConfig(BaseModel):
    etcd: EtcdUrls                               # e.g. https://10.77.0.3:2379[,https://…]
    host: HostRef                                # this host's name in the cluster
    ttl: int = Field(default=5, ge=2, le=60)     # host lease TTL, seconds
    vip_ttl: int = Field(default=1, ge=1, le=60)  # a VIP election's lease TTL (etcd raises
                                                  # it to its own minimum if shorter)
    margin: float = Field(default=1.0, ge=0)     # HA waits this long after a lease expires
    capacity_mb: int | None = None               # memory for guests (default: total - 512)
    cpu_ratio: float = Field(default=4.0, gt=0)  # vCPU overcommit for placement
    fence_command: Text | None = None            # run as `CMD HOST` before restarting



def check_url(v: str, what: str, example: str) -> str:
    """An http(s)://HOST[:PORT] URL with nothing after the host (ValueError otherwise)."""
    try:
        url = urllib.parse.urlsplit(v)
        port = url.port
    except ValueError:
        url, port = None, None
    if (url is None or url.scheme not in ("http", "https") or not url.hostname
            or url.path.strip("/") or url.query or url.fragment or port == 0
            or not v.isprintable() or " " in v):
        raise ValueError(f"invalid {what} URL {v[:80]!r} (expected e.g. {example})")
    return v


class Files:
    """Paths of the cluster files in one home."""

    def __init__(self, home: Home) -> None:
        self.dir = home.root / "cluster"
        self.run = home.run
        self.pki = home.pki

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def lease(self) -> Path:
        return self.dir / "lease"

    @property
    def fenced(self) -> Path:
        return self.dir / "fenced"

    @property
    def ha(self) -> Path:
        return self.dir / "ha"

    @property
    def pid(self) -> Path:
        return self.dir / "watchdog.pid"

    @property
    def log(self) -> Path:
        return self.dir / "watchdog.log"

    def load(self) -> ClusterConfig | None:
        try:
            return ClusterConfig.model_validate_json(self.config.read_text())
        except FileNotFoundError:
            return None

    def save(self, cfg: ClusterConfig) -> None:
        self.ha.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(cfg.model_dump_json(indent=2) + "\n")
        tmp.replace(self.config)

    @property
    def etcd_dir(self) -> Path:
        """The data of the etcd member this host runs, if it runs one (cluster init)."""
        return self.dir.parent / "etcd"

    @property
    def identity(self) -> Identity:
        return Identity(self.pki)

    def etcd(self, urls: str, *, timeout: float) -> Etcd:
        """A client for the cluster's etcd, with this host's certificate once it has one."""
        ident = self.identity
        return Etcd(urls, timeout=timeout,
                    tls=ident.client_context() if ident.exists() else None)

    def lease_id(self) -> int | None:
        try:
            return int(self.lease.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None
