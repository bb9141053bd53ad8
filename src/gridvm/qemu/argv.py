"""Compose a QEMU command line from small device objects built from a DomainConfig.

Each device knows only its own arguments; `build_argv` picks the devices for the domain's
profile (PV: direct kernel boot and virtio; HVM: SeaBIOS, IDE disks and e1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gridvm.config.model import NIC_MODELS, DiskSpec, DisplayParams, DomainConfig, VifSpec
from gridvm.errors import ConfigError
from gridvm.qemu import guestagent
from gridvm.qemu.confine import Confined, DiskFds


class Device(Protocol):
    def args(self) -> list[str]: ...


def escape(value: object) -> str:
    """One QEMU option value: commas doubled, as QEMU's option parser expects."""
    return str(value).replace(",", ",,")


def _opts(head: str, **kv: object) -> str:
    """`head,key=value,...` skipping None values; bools become on/off; values escaped."""
    parts = [head]
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key.replace('_', '-')}={escape(value)}")
    return ",".join(parts)


def ram_size(mb: int, accel: str) -> str:
    """`-m` for `mb` MiB. Under TCG, 8 KiB more: QEMU before 9.0 loses guest writes during a
    live migration when RAM is a multiple of 256 KiB (its word-at-a-time dirty-bitmap sync
    leaves TCG's TLB unreset; QEMU commit 03bfc2188f); any other size takes the per-page sync,
    which resets it."""
    return f"{mb}M" if accel == "kvm" else f"{mb * 1024 + 8}k"


@dataclass(frozen=True)
class Machine:
    accel: str
    name: str
    uuid: str
    memory: int
    maxmem: int
    vcpus: int
    maxvcpus: int | None = None
    vga: str = "none"

    def args(self) -> list[str]:
        cpu = "host" if self.accel == "kvm" else "qemu64"
        smp = str(self.vcpus) if self.maxvcpus is None else f"{self.vcpus},maxcpus={self.maxvcpus}"
        return [
            "-machine", f"pc,accel={self.accel}",
            "-cpu", cpu,
            "-name", _opts(escape(self.name), process=f"gridvm:{self.name}"),
            "-uuid", self.uuid,
            # RAM is sized for maxmem; gridvmd balloons down to `memory` after start.
            "-m", ram_size(self.maxmem, self.accel),
            "-smp", smp,
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", self.vga,
            # Guest power-off and panic pause QEMU (a guest reboot resets it in place);
            # gridvmd applies the on_* actions.
            "-action", "shutdown=pause,panic=pause",
        ]


@dataclass(frozen=True)
class Runtime:
    """Control sockets and files in the domain's run directory; a confined QEMU reaches
    them through its inherited run-dir descriptor and is not daemonized (gridvmd starts it
    detached: `-daemonize` forks, which the sandbox forbids)."""

    rundir: Path
    confined: Confined | None = None

    def args(self) -> list[str]:
        c = self.confined

        def r(name: str) -> str:
            return c.run(name) if c else str(self.rundir / name)

        return [
            "-qmp", f"unix:{escape(r('qmp.sock'))},server=on,wait=off",
            "-chardev", _opts("socket", id="ser0", path=r("serial.sock"), server=True,
                              wait=False, logfile=r("console.log"), logappend=True),
            "-serial", "chardev:ser0",
            # A confined QEMU cannot resolve a pid file's path: gridvmd writes it.
            *([] if c else ["-pidfile", r("qemu.pid"), "-daemonize"]),
        ]


@dataclass(frozen=True)
class DirectKernel:
    kernel: str
    ramdisk: str | None
    cmdline: str

    def args(self) -> list[str]:
        argv = ["-kernel", self.kernel, "-append", self.cmdline]
        if self.ramdisk:
            argv += ["-initrd", self.ramdisk]
        return argv


@dataclass(frozen=True)
class Firmware:
    """SeaBIOS boot from the disks (HVM)."""

    boot: str

    def args(self) -> list[str]:
        order = "".join(c for c in self.boot if c in "acdn") or "c"
        return ["-boot", f"order={order}"]


@dataclass(frozen=True)
class OemStrings:
    """Settings for the guest as SMBIOS OEM strings (`gridvm:key=value`), read by the tiny
    guest's init and by gridvm-identity in built and imported systems."""

    oem: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        argv: list[str] = []
        for value in self.oem:
            argv += ["-smbios", f"type=11,value=gridvm:{escape(value)}"]
        return argv


def _throttle(d: DiskSpec) -> dict[str, object]:
    return {
        "throttling.bps-total": d.bps, "throttling.bps-read": d.bps_rd,
        "throttling.bps-write": d.bps_wr, "throttling.iops-total": d.iops,
        "throttling.iops-read": d.iops_rd, "throttling.iops-write": d.iops_wr,
    }


def drive_id(vdev: str) -> str:
    """The -drive id (BlockBackend name) of a domain's disk `vdev` (stable across hotplug:
    the device itself has the id `vdev`)."""
    return f"vbd-{vdev}"


def is_virtio_disk(spec: DiskSpec, hvm: bool) -> bool:
    """PV disks are virtio; an HVM guest's are IDE, except `vd*` (Linux's virtio name)."""
    return not hvm or spec.vdev.startswith("vd")


def _addr(slot: int | None) -> str | None:
    return None if slot is None else f"0x{slot:x}"


def pci_slots(cfg: DomainConfig) -> dict[str, int] | None:
    """Explicit PCI slots by device id once hotplug has recorded any (`slot` of a disk or
    vif): recorded ones stay, the others take the lowest free slots in argv order, which is
    how QEMU lays out the same command line without addresses. None: QEMU lays them out."""
    hvm = cfg.type == "hvm"
    if all(d.slot is None for d in cfg.disks) and all(v.slot is None for v in cfg.vifs):
        return None
    order: list[tuple[str, int | None]] = []
    if cfg.display.card != "none":
        order.append(("vga", 2))       # -vga is created before any -device
    order += [(d.vdev, d.slot) for d in cfg.disks if is_virtio_disk(d, hvm)]
    order += [(f"nic{i}", v.slot) for i, v in enumerate(cfg.vifs)]
    order += [(dev, None) for dev in EXTRA_PCI]
    taken = {slot for _, slot in order if slot is not None}
    free = (n for n in range(2, 32) if n not in taken)
    slots: dict[str, int] = {}
    for dev, slot in order:
        if slot is None:
            slot = next(free, None)
            if slot is None:
                raise ConfigError(f"domain {cfg.name}: more PCI devices than slots")
        slots[dev] = slot
    return slots


EXTRA_PCI = ("balloon0", "rng0dev", guestagent.SERIAL_ID)   # PvDevices, AgentChannel


IDE_SLOTS = {"a": (0, 0), "b": (0, 1), "c": (1, 0), "d": (1, 1)}


@dataclass(frozen=True)
class Disk:
    """One disk; a virtio one gets `queues` queues (QEMU's default is one per boot vCPU,
    which would differ between a domain and its restored copy after vcpu-set)."""

    index: int
    spec: DiskSpec
    hvm: bool
    slot: int | None = None
    queues: int = 1
    fds: DiskFds | None = None

    @property
    def node(self) -> str:
        return drive_id(self.spec.vdev)

    def _ide_slot(self) -> tuple[int, int]:
        letter = self.spec.vdev.rstrip("0123456789")[-1:]
        if letter not in IDE_SLOTS:
            raise ConfigError(f"disk {self.spec.vdev}: HVM guests have four IDE slots (a-d)")
        return IDE_SLOTS[letter]

    def args(self) -> list[str]:
        s = self.spec
        files = self.fds.drive_opts() if self.fds else {"file": s.target}
        drive = _opts("if=none", id=self.node, format=s.format)
        drive += "," + ",".join(f"{k}={escape(v)}" for k, v in files.items())
        drive += _opts(
            "", readonly=(s.mode == "r") or None,
            media="cdrom" if s.devtype == "cdrom" else None,
            cache="none" if s.devtype == "disk" else None, aio="threads",
        )
        extra = ",".join(f"{k}={escape(v)}" for k, v in _throttle(s).items() if v)
        if extra:
            drive += "," + extra
        if is_virtio_disk(s, self.hvm):
            dev = _opts("virtio-blk-pci", drive=self.node, id=s.vdev, serial=s.vdev,
                        num_queues=self.queues, addr=_addr(self.slot))
        else:
            bus, unit = self._ide_slot()
            kind = "ide-cd" if s.devtype == "cdrom" else "ide-hd"
            dev = _opts(kind, drive=self.node, bus=f"ide.{bus}", unit=unit, id=s.vdev)
        return ["-drive", drive, "-device", dev]


def nic_model(spec: VifSpec, hvm: bool) -> str:
    """The QEMU device of a vif (the model validated it; never let a head through)."""
    model = spec.model or ("e1000" if hvm else "virtio-net-pci")
    if model in ("virtio", "virtio-net"):
        model = "virtio-net-pci"
    if model not in NIC_MODELS:
        raise ConfigError(f"unknown NIC model {model!r}")
    return model


@dataclass(frozen=True)
class Nic:
    index: int
    spec: VifSpec
    tap: str
    hvm: bool
    slot: int | None = None

    def args(self) -> list[str]:
        model = nic_model(self.spec, self.hvm)
        netdev = _opts("tap", id=f"vif{self.index}", ifname=self.tap, script="no",
                       downscript="no", vhost=None)
        return ["-netdev", netdev,
                "-device", _opts(model, netdev=f"vif{self.index}", mac=self.spec.mac,
                                 id=f"nic{self.index}", addr=_addr(self.slot))]


@dataclass(frozen=True)
class Vnc:
    """QEMU's VNC server on `listen`:5900+display (a free display from there with
    `search`); with `password`, VNC password authentication (the password itself is set
    over QMP after start, never on the command line)."""

    display: DisplayParams

    def args(self) -> list[str]:
        d = self.display
        host = f"[{d.listen}]" if ":" in d.listen else d.listen
        first = d.display or 0
        last = min(first + 99, 65535 - 5900) if d.search else None
        return ["-vnc", _opts(f"{host}:{first}", to=last, password=bool(d.password) or None)]


@dataclass(frozen=True)
class PvDevices:
    """Balloon, entropy and crash notification: Xen's paravirtual extras."""

    slots: dict[str, int] | None = None

    def args(self) -> list[str]:
        at = self.slots or {}
        return [
            "-device", _opts("virtio-balloon-pci", id="balloon0", addr=_addr(at.get("balloon0"))),
            "-object", "rng-random,filename=/dev/urandom,id=rng0",
            "-device", _opts("virtio-rng-pci", rng="rng0",
                             **({"id": "rng0dev", "addr": _addr(at["rng0dev"])}
                                if "rng0dev" in at else {})),
        ]


@dataclass(frozen=True)
class AgentChannel:
    """The guest agent's virtio-serial port (org.qemu.guest_agent.0), socket in the run dir."""

    rundir: Path
    slot: int | None = None
    confined: Confined | None = None

    def args(self) -> list[str]:
        c = self.confined
        path = c.run(guestagent.SOCKET_NAME) if c else None
        return guestagent.chardev_args(self.rundir, _addr(self.slot), path=path)


@dataclass(frozen=True)
class Pvpanic:
    def args(self) -> list[str]:
        return ["-device", "pvpanic"]


@dataclass(frozen=True)
class Incoming:
    def args(self) -> list[str]:
        return ["-incoming", "defer"]


def oem_strings(cfg: DomainConfig) -> list[str]:
    """What a PV guest gets on its command line (address, hostname), and the domain's guest
    variables, as OEM strings: firmware-booted guests read them, and every guest the vars."""
    oem = []
    ip = cfg.ip_param()
    if ip:
        oem.append(f"ip={ip}")
    if cfg.net.hostname:
        oem.append(f"gridvm.hostname={cfg.net.hostname}")
    oem += [f"gridvm.var.{k}={v}" for k, v in sorted(cfg.guest_vars.items())]
    return oem


def devices(cfg: DomainConfig, *, accel: str, rundir: Path, taps: list[str],
            incoming: bool = False, confined: Confined | None = None) -> list[Device]:
    """The device objects for one domain (with `confined`, QEMU gets descriptors)."""
    c = confined
    hvm = cfg.type == "hvm"
    slots = pci_slots(cfg)
    at = slots or {}
    devs: list[Device] = [
        Machine(accel, cfg.name, cfg.uuid, cfg.memory, cfg.max_memory, cfg.vcpus,
                cfg.maxvcpus, cfg.display.card),
        Runtime(rundir, c),
    ]
    if c is not None:
        devs.append(_Raw(c.args()))
    if hvm:
        devs.append(Firmware(cfg.boot))
    else:
        if not cfg.kernel:
            raise ConfigError(f"domain {cfg.name}: a PV domain needs a kernel")
        cmdline = " ".join(p for p in ("console=ttyS0", cfg.kernel_cmdline()) if p)
        if accel != "kvm" and "no_timer_check" not in cmdline.split():
            # Under TCG on a busy host the kernel's IO-APIC timer check can miss its ticks
            # and panic ("IO-APIC + timer doesn't work"); cloud images skip it the same way.
            cmdline += " no_timer_check"
        devs.append(DirectKernel((c.kernel or cfg.kernel) if c else cfg.kernel,
                                 (c.ramdisk or cfg.ramdisk) if c else cfg.ramdisk, cmdline))
    oem = oem_strings(cfg)
    if oem:
        devs.append(OemStrings(oem))
    devs += [Disk(i, d, hvm, at.get(d.vdev), cfg.max_vcpus, c.disks.get(d.vdev) if c else None)
             for i, d in enumerate(cfg.disks)]
    devs += [Nic(i, v, taps[i], hvm, at.get(f"nic{i}")) for i, v in enumerate(cfg.vifs)]
    if cfg.display.vnc:
        devs.append(Vnc(cfg.display))
    devs.append(PvDevices(slots))
    devs.append(AgentChannel(rundir, at.get(guestagent.SERIAL_ID), c))
    devs.append(Pvpanic())
    if incoming:
        devs.append(Incoming())
    return devs


@dataclass(frozen=True)
class _Raw:
    argv: list[str]

    def args(self) -> list[str]:
        return self.argv


def build_argv(binary: str, cfg: DomainConfig, *, accel: str, rundir: Path,
               taps: list[str], incoming: bool = False,
               confined: Confined | None = None) -> list[str]:
    """The full QEMU argv for `cfg`."""
    argv = [binary]
    for dev in devices(cfg, accel=accel, rundir=rundir, taps=taps, incoming=incoming,
                       confined=confined):
        argv += dev.args()
    return argv
