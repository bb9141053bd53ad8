"""The typed domain model every layer shares: what a domain is, independent of file format.

The xm/xl readers (`gridvm.config.xmfile`) produce a `DomainConfig`; the QEMU layer turns one
into an argv; the store keeps it as JSON.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Action = Literal[
    "destroy", "restart", "preserve", "rename-restart", "coredump-destroy", "coredump-restart"
]
DomainType = Literal["pv", "pvh", "hvm"]
HaPolicy = Literal["restart", "best-effort", "off"]

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiskSpec(Strict):
    """One vbd: a backing file (or block device) seen by the guest as `vdev`."""

    target: str = Field(description="absolute path of the image file or block device")
    vdev: str = Field(description="guest device name, e.g. xvda, hda, sdb")
    mode: Literal["r", "w"] = "w"
    format: Literal["raw", "qcow2"] = "raw"
    devtype: Literal["disk", "cdrom"] = "disk"
    # Per-disk I/O throttles (bytes/s, operations/s); None = unlimited.
    bps: int | None = None
    bps_rd: int | None = None
    bps_wr: int | None = None
    iops: int | None = None
    iops_rd: int | None = None
    iops_wr: int | None = None


class VifSpec(Strict):
    """One vif: a NIC on a bridge (or gridvm network) with a MAC."""

    mac: str | None = None
    bridge: str | None = None
    ip: str | None = None
    model: str | None = None
    rate: str | None = Field(default=None, description="xm rate grammar, e.g. 10Mb/s@20ms")
    vifname: str | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.lower()
        if not MAC_RE.match(v):
            raise ValueError(f"invalid MAC address {v!r}")
        return v


class Actions(Strict):
    on_poweroff: Action = "destroy"
    on_reboot: Action = "restart"
    on_crash: Action = "restart"


class Sched(Strict):
    """Credit-scheduler parameters: weight 1..65535 (relative), cap % of one CPU (0 = none)."""

    weight: int = Field(default=256, ge=1, le=65535)
    cap: int = Field(default=0, ge=0)


class NetParams(Strict):
    """The top-level xm keys that build the kernel's `ip=` parameter."""

    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    hostname: str | None = None
    dhcp: str | None = None


class HaParams(Strict):
    """Cluster placement and HA intent (used by the cluster layer)."""

    ha: HaPolicy = "off"
    ha_priority: int = 0
    ha_group: str | None = None
    hosts: list[str] = Field(default_factory=list)


class DomainConfig(Strict):
    """A normalized domain definition."""

    name: str
    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    type: DomainType = "pv"
    memory: int = Field(default=128, ge=16, description="MiB at start")
    maxmem: int | None = Field(default=None, description="MiB ceiling for ballooning")
    vcpus: int = Field(default=1, ge=1, le=64)
    cpus: str | None = Field(default=None, description="Xen cpu list for pinning, e.g. 0-3,^1")
    kernel: str | None = None
    ramdisk: str | None = None
    root: str | None = None
    extra: str | None = None
    cmdline: str | None = Field(default=None, description="full kernel cmdline if given (xl)")
    disks: list[DiskSpec] = Field(default_factory=list)
    vifs: list[VifSpec] = Field(default_factory=list)
    actions: Actions = Field(default_factory=Actions)
    sched: Sched = Field(default_factory=Sched)
    net: NetParams = Field(default_factory=NetParams)
    ha: HaParams = Field(default_factory=HaParams)
    serial: str = "pty"
    boot: str = "c"
    bootloader: str | None = Field(default=None, description="pygrub: boot the kernel the "
                                   "first disk's GRUB configuration names (PV domains)")
    bootloader_args: list[str] = Field(default_factory=list)
    guest_vars: dict[str, str] = Field(default_factory=dict, description="KEY=VALUE settings "
                                       "for the guest (SMBIOS OEM strings gridvm.var.KEY)")
    source_file: str | None = None
    source_format: Literal["xm", "xl", "api"] = "api"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                f"invalid domain name {v!r} (letters, digits, '.', '_', '-'; up to 63)"
            )
        if v.isdigit():
            raise ValueError(f"domain name {v!r} must not be all digits (a domid)")
        return v

    @field_validator("guest_vars")
    @classmethod
    def _guest_vars(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not VAR_RE.match(key):
                raise ValueError(f"invalid guest variable name {key!r} (letters, digits, _)")
            if len(value) > 1024 or any(c in value for c in "\n\r\0"):
                raise ValueError(f"guest variable {key}: value too long or not one line")
        return v

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuidlib.UUID(v))
        except ValueError as exc:
            raise ValueError(f"invalid uuid {v!r}") from exc

    @property
    def max_memory(self) -> int:
        return max(self.maxmem or self.memory, self.memory)

    def ip_param(self) -> str | None:
        """The kernel `ip=` value xm builds from ip/netmask/gateway/hostname/dhcp, if any."""
        n = self.net
        if n.ip:
            return f"{n.ip}::{n.gateway or ''}:{n.netmask or ''}:{n.hostname or ''}:eth0:off"
        if n.dhcp == "dhcp":
            return f"::::{n.hostname or ''}:eth0:dhcp"
        return None

    def kernel_cmdline(self) -> str:
        """The full command line a PV guest boots with (xm: root + ip + extra; xl: cmdline)."""
        if self.cmdline is not None:
            return self.cmdline
        parts: list[str] = []
        if self.root:
            parts.append(f"root={self.root}")
        ip = self.ip_param()
        if ip:
            parts.append(f"ip={ip}")
        if self.net.hostname and not self.net.ip:
            parts.append(f"gridvm.hostname={self.net.hostname}")
        if self.extra:
            parts.append(self.extra)
        return " ".join(parts)
