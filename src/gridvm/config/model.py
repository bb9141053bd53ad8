"""The typed domain model every layer shares: what a domain is, independent of file format.

The xm/xl readers (`gridvm.config.xmfile`) produce a `DomainConfig`; the QEMU layer turns one
into an argv; the store keeps it as JSON.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

Action = Literal[
    "destroy", "restart", "preserve", "rename-restart", "coredump-destroy", "coredump-restart"
]
DomainType = Literal["pv", "pvh", "hvm"]
HaPolicy = Literal["restart", "best-effort", "fence", "off"]
"""restart/best-effort: restarted elsewhere by the HA manager; fence: killed with its host's
self-fencing but never restarted elsewhere (its data lives on its host, e.g. a database
member whose service fails over inside the guests); off: neither."""
RESTARTED: tuple[str, ...] = ("restart", "best-effort")

MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
VDEV_RE = re.compile(r"(?:xvd|hd|sd|vd)[a-z]{1,3}\d{0,3}")
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
HOSTREF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
RATE_RE = re.compile(r"\d+(?:\.\d+)?[GMK]?[bB](?:/s)?(?:@\d+(?:\.\d+)?[mu]?s)?")
_CPU_ITEM = r"(?:all|\^?\d{1,4}(?:-\d{1,4})?)"
CPUS_RE = re.compile(rf"{_CPU_ITEM}(?:,{_CPU_ITEM})*")
# QEMU NIC models a vif may ask for (`virtio`/`virtio-net` mean virtio-net-pci).
NIC_MODELS = frozenset({
    "e1000", "e1000e", "e1000-82544gc", "e1000-82545em", "rtl8139", "ne2k_pci", "pcnet",
    "i82550", "i82551", "i82557a", "i82557b", "i82557c", "i82558a", "i82558b", "i82559a",
    "i82559b", "i82559c", "i82559er", "i82562", "i82801", "vmxnet3", "tulip",
    "virtio", "virtio-net", "virtio-net-pci",
})
MAX_DISKS = 16
MAX_VIFS = 8
MAX_PATH = 4096
MAX_CMDLINE = 2048
MAX_MIB = 16 * 1024 * 1024
MAX_VCPUS = 64
MAX_VNC_DISPLAY = 65535 - 5900
PCI_SLOTS = (2, 31)            # i440fx: 0 host bridge, 1 PIIX3; the rest may be hot-plugged


def _path(v: str) -> str:
    """An absolute host path, as one QEMU option value (commas are escaped by the argv)."""
    if not v.startswith("/"):
        raise ValueError(f"{v!r} is not an absolute path")
    if len(v) > MAX_PATH or any(c in v for c in "\x00\n\r"):
        raise ValueError(f"{v[:80]!r} is not a usable path (too long, NUL or newline)")
    return v


def _text(v: str) -> str:
    """Free text that reaches QEMU or the guest's command line as one argument."""
    if len(v) > MAX_CMDLINE or any(ord(c) < 32 and c != "\t" for c in v):
        raise ValueError(f"{v[:80]!r}: control characters or longer than {MAX_CMDLINE}")
    return v


def _ifname(v: str) -> str:
    if not IFNAME_RE.fullmatch(v) or v in (".", ".."):
        raise ValueError(f"bad interface name {v!r} (letters, digits, '_', '.', '-'; up to 15)")
    return v


def _ip(v: str) -> str:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None
    return v


def _hostname(v: str) -> str:
    if not HOSTNAME_RE.fullmatch(v):
        raise ValueError(f"bad host name {v!r}")
    return v


def _hostref(v: str) -> str:
    if not HOSTREF_RE.fullmatch(v):
        raise ValueError(f"bad host name {v!r}")
    return v


Path_ = Annotated[str, AfterValidator(_path)]
Text = Annotated[str, AfterValidator(_text)]
IfName = Annotated[str, AfterValidator(_ifname)]
IpAddr = Annotated[str, AfterValidator(_ip)]
HostName = Annotated[str, AfterValidator(_hostname)]
HostRef = Annotated[str, AfterValidator(_hostref)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiskSpec(Strict):
    """One vbd: a backing file (or block device) seen by the guest as `vdev`."""

    target: Path_ = Field(description="absolute path of the image file or block device")
    vdev: str = Field(description="guest device name, e.g. xvda, hda, sdb")
    mode: Literal["r", "w"] = "w"
    format: Literal["raw", "qcow2"] = "raw"
    devtype: Literal["disk", "cdrom"] = "disk"
    # Per-disk I/O throttles (bytes/s, operations/s); None = unlimited.
    bps: int | None = Field(default=None, ge=1, lt=1 << 62)
    bps_rd: int | None = Field(default=None, ge=1, lt=1 << 62)
    bps_wr: int | None = Field(default=None, ge=1, lt=1 << 62)
    iops: int | None = Field(default=None, ge=1, le=10**9)
    iops_rd: int | None = Field(default=None, ge=1, le=10**9)
    iops_wr: int | None = Field(default=None, ge=1, le=10**9)
    slot: int | None = Field(default=None, ge=PCI_SLOTS[0], le=PCI_SLOTS[1], description=(
        "PCI slot (virtio disks), recorded by hotplug so the guest keeps its addresses"))

    @field_validator("vdev")
    @classmethod
    def _vdev(cls, v: str) -> str:
        if not VDEV_RE.fullmatch(v):
            raise ValueError(f"bad virtual device {v!r} (expected e.g. xvda, hda, sdb)")
        return v


class VifSpec(Strict):
    """One vif: a NIC on a bridge (or gridvm network) with a MAC."""

    mac: str | None = None
    bridge: IfName | None = None
    ip: str | None = Field(default=None, description="addresses the guest uses, space-separated")
    model: str | None = None
    rate: str | None = Field(default=None, description="xm rate grammar, e.g. 10Mb/s@20ms")
    pps: int | None = Field(default=None, ge=1, le=10_000_000, description=(
        "packets per second the guest may send; more are dropped (a small-packet flood "
        "passes a byte rate)"))
    vifname: IfName | None = None
    slot: int | None = Field(default=None, ge=PCI_SLOTS[0], le=PCI_SLOTS[1], description=(
        "PCI slot, recorded by hotplug so the guest keeps its addresses"))

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.lower()
        if not MAC_RE.fullmatch(v):
            raise ValueError(f"invalid MAC address {v!r}")
        if int(v[:2], 16) & 1:
            raise ValueError(f"MAC address {v} is a multicast address")
        return v

    @field_validator("ip")
    @classmethod
    def _ips(cls, v: str | None) -> str | None:
        if v is None:
            return None
        for addr in v.split(" "):
            try:
                ipaddress.ip_interface(addr)
            except ValueError:
                raise ValueError(f"bad ip {addr!r}") from None
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v is not None and v not in NIC_MODELS:
            raise ValueError(f"unknown NIC model {v[:40]!r} (one of: "
                             f"{', '.join(sorted(NIC_MODELS))})")
        return v

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None and not RATE_RE.fullmatch(v):
            raise ValueError(f"bad rate {v[:40]!r} (expected e.g. 10Mb/s or 1MB/s@20ms)")
        return v


class Actions(Strict):
    on_poweroff: Action = "destroy"
    on_reboot: Action = "restart"
    on_crash: Action = "restart"


class Sched(Strict):
    """Credit-scheduler parameters: weight 1..65535 (relative), cap % of one CPU (0 = none)."""

    weight: int = Field(default=256, ge=1, le=65535)
    cap: int = Field(default=0, ge=0, le=6400)


class NetParams(Strict):
    """The top-level xm keys that build the kernel's `ip=` parameter."""

    ip: IpAddr | None = None
    netmask: str | None = None
    gateway: IpAddr | None = None
    hostname: HostName | None = None
    dhcp: Literal["dhcp", "off"] | None = None

    @field_validator("netmask")
    @classmethod
    def _netmask(cls, v: str | None) -> str | None:
        if v is None or (v.isascii() and v.isdigit() and int(v) <= 128):
            return v
        return _ip(v)


def _vnc_password(v: str) -> str:
    if not 1 <= len(v) <= 8 or not all(32 <= ord(c) < 127 for c in v):
        raise ValueError("a VNC password is 1 to 8 printable ASCII characters")
    return v


class DisplayParams(Strict):
    """The graphical console (xm/xl vnc, vnclisten, vncdisplay, vncunused, vncpasswd, vfb,
    stdvga, vga): a VGA and QEMU's VNC server on `listen`:5900+display."""

    vnc: bool = False
    listen: IpAddr = "127.0.0.1"
    display: int | None = Field(default=None, ge=0, le=MAX_VNC_DISPLAY,
                                description="fixed display (port 5900+N); None: a free one")
    unused: bool | None = Field(default=None, description="find a free display from "
                                "`display` (or 0) up; default: unless a display is given")
    password: Annotated[str, AfterValidator(_vnc_password)] | None = None
    vga: Literal["std", "cirrus", "none"] | None = Field(
        default=None, description="the emulated graphics card (std when vnc is on)")

    @property
    def search(self) -> bool:
        """Whether QEMU looks for a free display rather than insisting on `display`."""
        return self.unused if self.unused is not None else self.display is None

    @property
    def card(self) -> str:
        """The VGA the guest gets: none unless asked for or needed by VNC."""
        return self.vga or ("std" if self.vnc else "none")


class HaParams(Strict):
    """Cluster placement and HA intent (used by the cluster layer)."""

    ha: HaPolicy = "off"
    ha_priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    ha_group: HostRef | None = None
    hosts: list[HostRef] = Field(default_factory=list, max_length=64)


class DomainConfig(Strict):
    """A normalized domain definition.

    Every entry point (config files, the API, save files, relocation) validates through
    this model, so whatever reaches QEMU's argv has passed these checks.
    """

    name: str
    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    type: DomainType = "pv"
    memory: int = Field(default=128, ge=16, le=MAX_MIB, description="MiB at start")
    maxmem: int | None = Field(default=None, ge=16, le=MAX_MIB,
                               description="MiB ceiling for ballooning")
    mem_limit: int | None = Field(default=None, ge=16, le=MAX_MIB, description=(
        "MiB: hard ceiling on the QEMU process's host memory (its cgroup), guest RAM and "
        "QEMU's own; more than maxmem"))
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    maxvcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS,
                                 description="vCPUs vcpu-set may bring online (xl maxvcpus)")
    cpus: str | None = Field(default=None, description="Xen cpu list for pinning, e.g. 0-3,^1")
    kernel: Path_ | None = None
    ramdisk: Path_ | None = None
    root: Text | None = None
    extra: Text | None = None
    cmdline: Text | None = Field(default=None, description="full kernel cmdline if given (xl)")
    disks: list[DiskSpec] = Field(default_factory=list, max_length=MAX_DISKS)
    vifs: list[VifSpec] = Field(default_factory=list, max_length=MAX_VIFS)
    actions: Actions = Field(default_factory=Actions)
    sched: Sched = Field(default_factory=Sched)
    net: NetParams = Field(default_factory=NetParams)
    ha: HaParams = Field(default_factory=HaParams)
    display: DisplayParams = Field(default_factory=DisplayParams)
    serial: Text = "pty"
    boot: str = Field(default="c", pattern=r"^[acdn]{1,4}$")
    bootloader: Literal["pygrub"] | None = Field(
        default=None, description="pygrub: boot the kernel the first disk's GRUB "
        "configuration names (PV domains)")
    bootloader_args: list[Text] = Field(default_factory=list, max_length=16)
    guest_vars: dict[str, str] = Field(default_factory=dict, description="KEY=VALUE settings "
                                       "for the guest (SMBIOS OEM strings gridvm.var.KEY)")
    source_file: Path_ | None = None
    source_format: Literal["xm", "xl", "api"] = "api"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_name(v)
        return v

    @field_validator("guest_vars")
    @classmethod
    def _guest_vars(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not VAR_RE.fullmatch(key):
                raise ValueError(f"invalid guest variable name {key!r} (letters, digits, _)")
            if len(value) > 1024 or any(ord(c) < 32 for c in value):
                raise ValueError(f"guest variable {key}: value too long or not one line")
        return v

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuidlib.UUID(v))
        except ValueError as exc:
            raise ValueError(f"invalid uuid {v!r}") from exc

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: str | None) -> str | None:
        if v is not None and not CPUS_RE.fullmatch(v):
            raise ValueError(f"bad cpu list {v[:40]!r} (expected e.g. 0-3,^1)")
        return v

    @model_validator(mode="after")
    def _devices(self) -> DomainConfig:
        vdevs = [d.vdev for d in self.disks]
        dup = next((v for v in vdevs if vdevs.count(v) > 1), None)
        if dup:
            raise ValueError(f"disk device {dup} used twice")
        macs = [v.mac for v in self.vifs if v.mac]
        dup = next((m for m in macs if macs.count(m) > 1), None)
        if dup:
            raise ValueError(f"MAC {dup} used twice")
        slots = [d.slot for d in self.disks if d.slot is not None]
        slots += [v.slot for v in self.vifs if v.slot is not None]
        twice = next((s for s in slots if slots.count(s) > 1), None)
        if twice is not None:
            raise ValueError(f"PCI slot {twice} used twice")
        if self.mem_limit is not None and self.mem_limit <= self.max_memory:
            raise ValueError(f"mem_limit {self.mem_limit} MiB must be more than maxmem "
                             f"{self.max_memory} MiB (QEMU needs room of its own)")
        if self.maxvcpus is not None and self.maxvcpus < self.vcpus:
            raise ValueError(f"vcpus {self.vcpus} is more than maxvcpus {self.maxvcpus}")
        return self

    @property
    def max_vcpus(self) -> int:
        return max(self.maxvcpus or self.vcpus, self.vcpus)

    def public(self) -> dict[str, Any]:
        """The config as JSON for views and listings: the VNC password masked."""
        data = self.model_dump(mode="json")
        if self.display.password:
            data["display"]["password"] = "********"
        return data

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


def check_name(v: str) -> str:
    """A domain name: letters, digits, '.', '_', '-' (up to 63), not all digits."""
    if not NAME_RE.fullmatch(v):
        raise ValueError(
            f"invalid domain name {v[:80]!r} (letters, digits, '.', '_', '-'; up to 63)"
        )
    if v.isdigit():
        raise ValueError(f"domain name {v!r} must not be all digits (a domid)")
    return v
