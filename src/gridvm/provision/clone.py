"""Templates and linked clones: read-only images, and qcow2 overlays with a domain config.

A template is an image marked read-only (image.json `template: true`, files mode 0444;
gridvmd refuses to open a template's disk writable). A clone is a qcow2 overlay backed by
the template's disk plus an xm config that gives it its identity:

* a MAC of its own (Xen's OUI, unique on this host);
* hostname, static address (or DHCP) and guest variables, passed to the guest by gridvm
  (kernel command line for PV/pygrub boots, SMBIOS OEM strings for every boot) and applied
  by `gridvm-identity` inside it;
* machine-id and SSH host keys made fresh at first boot: the template's were reset
  (`sysprep`), so systemd and gridvm-identity generate new ones in each clone; DHCP
  identity follows (networkd's client id is the MAC; its DUID derives from machine-id).

Templates that have cloud-init (`cloud_init` in image.json) also get the ecosystem's
standard: a NoCloud seed per clone (`nocloud`), attached read-only.

Files: HOME/disks/NAME.qcow2 (and NAME-seed.iso), HOME/domains/NAME.cfg.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from gridvm.config.macs import generate_mac
from gridvm.config.model import NAME_RE, VAR_RE
from gridvm.errors import ConfigError, Conflict, GridvmError
from gridvm.host import procs
from gridvm.images.store import ImageInfo, get_image, write_manifest
from gridvm.paths import Home
from gridvm.provision import nocloud

TEMPLATE_MODE = 0o444
MAX_CLONES = 256


@dataclass(frozen=True)
class CloneSpec:
    """One clone's identity."""

    name: str
    hostname: str
    mac: str
    address: ipaddress.IPv4Interface | None = None
    gateway: str | None = None
    guest_vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Machine:
    """The virtual hardware of the clones."""

    type: str = "pv"              # pv (pygrub) or hvm (SeaBIOS + GRUB)
    memory: int = 512
    vcpus: int = 1
    bridge: str = "xenbr0"


# ----- templates -----------------------------------------------------------------------------


def mark_template(images_dir: Path, name: str) -> ImageInfo:
    """Make image `name` a read-only template (idempotent)."""
    info = get_image(images_dir, name)
    if info.disk is None or info.kind == "tiny":
        raise ConfigError(f"image {name} has no system disk to clone (build or import one)")
    image_dir = images_dir / name
    if not info.template:
        write_manifest(image_dir, _with(info, template=True))
    for path in image_dir.iterdir():
        if path.is_file():
            path.chmod(TEMPLATE_MODE)
    return get_image(images_dir, name)


def unmark_template(images_dir: Path, name: str, in_use: Collection[Path] = ()) -> ImageInfo:
    """Make a template writable again; refused while clones (`in_use`) depend on it."""
    info = get_image(images_dir, name)
    if in_use:
        shown = ", ".join(str(p) for p in sorted(in_use)[:3])
        raise Conflict(f"template {name} has clones ({shown}{', …' if len(in_use) > 3 else ''}); "
                       "delete them first")
    image_dir = images_dir / name
    for path in image_dir.iterdir():
        if path.is_file():
            path.chmod(0o644)
    if info.template:
        write_manifest(image_dir, _with(info, template=False))
    return get_image(images_dir, name)


def _with(info: ImageInfo, **changes: object) -> ImageInfo:
    data = {**info.__dict__, **changes}
    return ImageInfo(**data)


def backing_file(disk: Path) -> Path | None:
    """The backing file of a qcow2 image (None if it has none)."""
    out = procs.run(["qemu-img", "info", "--output=json", "-U", str(disk)], timeout=30).stdout
    backing = json.loads(out).get("full-backing-filename") or json.loads(out).get(
        "backing-filename")
    return Path(backing) if backing else None


def clones_of(home: Home, info: ImageInfo) -> list[Path]:
    """Overlays in this home's disks directory backed by the image's disk."""
    if info.disk is None or not home.disks.is_dir():
        return []
    target = info.disk.resolve()
    out = []
    for disk in sorted(home.disks.glob("*.qcow2")):
        try:
            backing = backing_file(disk)
        except procs.CommandError:
            continue
        if backing is not None and backing.resolve() == target:
            out.append(disk)
    return out


# ----- planning ----------------------------------------------------------------------------


def plan(name: str, *, count: int = 1, hostname: str | None = None, ip: str | None = None,
         gateway: str | None = None, guest_vars: dict[str, str] | None = None,
         used_macs: Collection[str] = ()) -> list[CloneSpec]:
    """The clones `gridvm clone` makes: NAME, or NAME1..NAMEn with consecutive addresses."""
    if not 1 <= count <= MAX_CLONES:
        raise ConfigError(f"--count must be 1..{MAX_CLONES}")
    names = [name] if count == 1 else [f"{name}{i}" for i in range(1, count + 1)]
    for n in names:
        if not NAME_RE.fullmatch(n) or n.isdigit():
            raise ConfigError(f"invalid domain name {n!r}")
    address = None
    if ip is not None:
        try:
            address = ipaddress.IPv4Interface(ip if "/" in ip else f"{ip}/24")
        except ValueError as exc:
            raise ConfigError(f"invalid --ip {ip!r}: {exc}") from None
        last = address.ip + (count - 1)
        if last not in address.network or last == address.network.broadcast_address:
            raise ConfigError(f"--ip {ip} --count {count}: the addresses leave "
                              f"{address.network}")
    if gateway is not None:
        try:
            ipaddress.IPv4Address(gateway)
        except ValueError:
            raise ConfigError(f"invalid --gateway {gateway!r}") from None
    for key in guest_vars or {}:
        if not VAR_RE.fullmatch(key):
            raise ConfigError(f"invalid guest variable name {key!r}")
    taken = set(used_macs)
    out = []
    for i, n in enumerate(names):
        mac = generate_mac(taken)
        taken.add(mac)
        host = hostname if count == 1 and hostname else (f"{hostname}{i + 1}" if hostname else n)
        addr = ipaddress.IPv4Interface(f"{address.ip + i}/{address.network.prefixlen}") \
            if address else None
        values = {"clone_index": str(i + 1), **(guest_vars or {})}
        out.append(CloneSpec(n, host, mac, addr, gateway, values))
    return out


# ----- files -------------------------------------------------------------------------------


def config_text(spec: CloneSpec, template: ImageInfo, disk: Path, machine: Machine,
                seed: Path | None = None) -> str:
    """The clone's xm config (with its NoCloud seed as a read-only disk, if it has one)."""
    hvm = machine.type == "hvm"
    lines = [
        f"# gridvm clone of template {template.name} ({template.os or template.kind}, "
        f"{template.arch})",
        f'name = "{spec.name}"',
        f"memory = {machine.memory}",
        f"vcpus = {machine.vcpus}",
    ]
    if hvm:
        extra = f", 'file:{seed},hdc:cdrom,r'" if seed else ""
        lines += ['builder = "hvm"', f"disk = [ 'tap:qcow2:{disk},hda,w'{extra} ]",
                  f"vif = [ 'mac={spec.mac}, bridge={machine.bridge}, model=e1000' ]"]
    else:
        extra = f", 'file:{seed},xvdb,r'" if seed else ""
        lines += ['bootloader = "pygrub"', f"disk = [ 'tap:qcow2:{disk},xvda,w'{extra} ]",
                  f"vif = [ 'mac={spec.mac}, bridge={machine.bridge}' ]"]
    lines.append(f'hostname = "{spec.hostname}"')
    if spec.address is not None:
        lines += [f'ip = "{spec.address.ip}"', f'netmask = "{spec.address.netmask}"']
        if spec.gateway:
            lines.append(f'gateway = "{spec.gateway}"')
    else:
        lines.append('dhcp = "dhcp"')
    if spec.guest_vars:
        items = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}"
                          for k, v in sorted(spec.guest_vars.items()))
        lines.append(f"guest_vars = {{ {items} }}")
    return "\n".join(lines) + "\n"


@dataclass
class Made:
    """Files made for clones, removed again if a later step fails."""

    paths: list[Path] = field(default_factory=list)

    def remove(self) -> None:
        for path in reversed(self.paths):
            path.unlink(missing_ok=True)
        self.paths.clear()


def check_free(home: Home, specs: list[CloneSpec]) -> None:
    for spec in specs:
        for path in (home.disks / f"{spec.name}.qcow2", home.disks / f"{spec.name}-seed.iso",
                     home.domain_configs / f"{spec.name}.cfg"):
            if path.exists():
                raise Conflict(f"{path} already exists (a clone named {spec.name}?)")


def make_files(home: Home, template: ImageInfo, spec: CloneSpec, machine: Machine,
               made: Made) -> Path:
    """Create the overlay and config of one clone; returns the config's path."""
    if not template.template or template.disk is None:
        raise ConfigError(f"image {template.name} is not a template: run "
                          f"'gridvm image template {template.name}' first (clones share "
                          "its disk, so it must never change)")
    home.disks.mkdir(parents=True, exist_ok=True)
    home.domain_configs.mkdir(parents=True, exist_ok=True)
    disk = home.disks / f"{spec.name}.qcow2"
    cfg = home.domain_configs / f"{spec.name}.cfg"
    fmt = template.disk_format
    made.paths.append(disk)
    try:
        procs.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b",
                   str(template.disk), str(disk)], timeout=60)
    except procs.CommandError as exc:
        raise GridvmError(f"clone {spec.name}: {exc}") from None
    disk.chmod(stat.S_IRUSR | stat.S_IWUSR)
    seed = None
    if template.cloud_init:   # the ecosystem's way for images that have cloud-init
        seed = home.disks / f"{spec.name}-seed.iso"
        made.paths.append(seed)
        nocloud.make_seed(seed, spec, instance_id=f"{spec.name}-{uuid.uuid4()}")
    made.paths.append(cfg)
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(config_text(spec, template, disk, machine, seed))
    return cfg
