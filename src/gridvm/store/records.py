"""What the store keeps about a domain: its configuration and the host's intent for it."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field

from gridvm.config.model import DomainConfig
from gridvm.lifecycle import DomainState


class DomainRecord(BaseModel):
    config: DomainConfig
    managed: bool = False          # defined with `new`: stays when it stops
    domid: int | None = None       # set while a QEMU exists for it
    state: DomainState = DomainState.SHUTOFF   # changed only by gridvm.lifecycle.change
    started_at: float | None = None  # wall clock of the current boot
    restarts: list[float] = Field(default_factory=list)  # recent automatic restarts
    taps: list[str] = Field(default_factory=list)
    accel: str | None = None
    shutdown_reason: str | None = None
    vcpu_pins: dict[int, str] = Field(default_factory=dict)  # per-vCPU pins (vcpu-pin)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def uuid(self) -> str:
        return self.config.uuid


class Store(Protocol):
    """State behind one interface: SQLite on one host, etcd in a cluster."""

    def put(self, rec: DomainRecord) -> None: ...
    def get(self, uuid: str) -> DomainRecord | None: ...
    def by_name(self, name: str) -> DomainRecord | None: ...
    def all(self) -> list[DomainRecord]: ...
    def delete(self, uuid: str, *, reason: str | None = None) -> None:
        """Forget a domain. `reason` is why it stopped, when it stopped on its own and this
        host does not restart it (a cluster then restarts an HA domain elsewhere)."""
        ...

    def hands_over(self, rec: DomainRecord, reason: str) -> bool:
        """True if, when this host does not restart `rec` after it stopped for `reason`,
        another party restarts it (an HA domain in a cluster): the host keeps no copy."""
        ...
    def next_domid(self) -> int: ...
    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...

    def arrived(self, rec: DomainRecord) -> None:
        """A live migration to this host completed: shared state about the domain (a
        cluster's registry) now names this host."""
        ...

    def departing(self, uuid: str) -> None:
        """The domain now runs on another host: removing it here leaves shared state be."""
        ...
