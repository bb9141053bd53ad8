"""Build a Debian guest image from a recipe: mmdebstrap, configure, disk, GRUB, qcow2.

Steps (each reported to a `Progress`):

1. `mmdebstrap --variant=minbase` into a directory: base packages (systemd, the kernel,
   qemu-guest-agent, OpenSSH, …) and the recipe's;
2. configure the tree as files (hostname, fstab by filesystem UUID, the network for any
   interface name, users and keys, files, services, first-boot commands, gridvm's identity
   and GRUB scripts), then reset its identity as virt-sysprep does;
3. a partitioned raw disk with the tree as ext4 and GRUB in the MBR gap (`disk.py`, no
   mounts); the kernel and initrd are exported for PV direct boot;
4. `qemu-img convert` to qcow2, the image's disk.

The image directory appears only when everything succeeded (`staging.staged`); a recipe
already built (same hash) is returned at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import time
import uuid as uuidlib
from pathlib import Path
from typing import Protocol

from gridvm.errors import ConfigError, GridvmError, ResourceError
from gridvm.host import procs
from gridvm.images.store import ImageInfo, get_image, write_manifest
from gridvm.provision import disk, guestfiles, netconfig, staging, sysprep
from gridvm.provision.recipe import Recipe, recipe_hash, source_path
from gridvm.provision.tree import Tree

GRUB_CMDLINE = "ro console=tty0 console=ttyS0,115200 net.ifnames=0 no_timer_check"
PV_CMDLINE = "ro net.ifnames=0"
PHASES = ("mmdebstrap", "configure", "filesystem and GRUB", "qcow2")
TOOLS = ("mmdebstrap", "sfdisk", "mkfs.ext4", "grub-mkimage", "qemu-img", "chroot")


class Progress(Protocol):
    """Where a build reports: a new phase, or a line of detail within it."""

    def phase(self, index: int, total: int, text: str) -> None: ...

    def detail(self, text: str) -> None: ...


class QuietProgress:
    def phase(self, index: int, total: int, text: str) -> None:
        return None

    def detail(self, text: str) -> None:
        return None


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ResourceError(f"missing host tools: {', '.join(missing)} (run scripts/setup.sh)")


def cached(images_dir: Path, name: str, digest: str) -> ImageInfo | None:
    """The image `name` if it was built from a recipe with this hash."""
    try:
        info = get_image(images_dir, name)
    except GridvmError:
        return None
    return info if info.kind == "debian" and info.recipe == digest else None


def build_debian(images_dir: Path, recipe: Recipe, *, name: str | None = None,
                 base_dir: Path | None = None, force: bool = False,
                 progress: Progress | None = None) -> ImageInfo:
    """Build (or return the cached) image for `recipe` as images_dir/NAME."""
    report = progress or QuietProgress()
    images_dir = Path(images_dir).absolute()
    name = staging.check_name(name or recipe.name)
    digest = recipe_hash(recipe, base_dir)
    if not force and (hit := cached(images_dir, name, digest)) is not None:
        return hit
    existing = (images_dir / name / "image.json").is_file()
    if existing and get_image(images_dir, name).kind != "debian":
        raise ConfigError(f"image {name!r} exists and was not built from a recipe; "
                          "choose another name")
    need_tools(*TOOLS)
    try:
        with staging.staged(images_dir, name, replace=True) as work:
            if not force and cached(images_dir, name, digest) is not None:
                raise _AlreadyBuilt  # by another build while we waited for the lock
            if existing and get_image(images_dir, name).template:
                raise ConfigError(f"image {name!r} is a template; its clones depend on it")
            started = time.monotonic()
            _build(work, recipe, name, digest, base_dir, report)
            report.detail(f"built {name} in {time.monotonic() - started:.0f} s")
    except _AlreadyBuilt:
        pass
    return get_image(images_dir, name)


class _AlreadyBuilt(Exception):
    """Raised inside the staging context to leave it without replacing the image."""


def _build(work: Path, recipe: Recipe, name: str, digest: str, base_dir: Path | None,
           report: Progress) -> ImageInfo:
    total = len(PHASES)
    root = work / "root"
    out = work / "out"
    report.phase(1, total, f"mmdebstrap {recipe.release}/{recipe.arch}")
    mmdebstrap(recipe, root, report)
    report.phase(2, total, "configuring the system")
    fs_uuid = str(uuidlib.uuid4())
    tree = Tree(root)
    configure(tree, recipe, fs_uuid, base_dir)
    version = newest_kernel(tree)
    shutil.copyfile(root / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    shutil.copyfile(root / "boot" / f"initrd.img-{version}", out / "initrd.img")
    os_name = _os_name(tree)
    report.phase(3, total, f"ext4 filesystem and GRUB ({recipe.disk_size})")
    raw = work / "disk.raw"
    disk.make_boot_disk(raw, root, recipe.size_bytes, uuid=fs_uuid)
    shutil.rmtree(root)
    report.phase(4, total, "converting to qcow2")
    disk.to_qcow2(raw, out / "disk.qcow2")
    info = ImageInfo(
        name=name, kernel=out / "vmlinuz", ramdisk=out / "initrd.img",
        disk=out / "disk.qcow2", cmdline=f"root=UUID={fs_uuid} {PV_CMDLINE}",
        kernel_version=version, recipe=digest, kind="debian", arch=recipe.arch,
        disk_format="qcow2", root=f"UUID={fs_uuid}", os=os_name, agent=True,
        virtual_size=recipe.size_bytes - recipe.size_bytes % (1 << 20),
    )
    (out / "recipe.json").write_text(recipe.model_dump_json(indent=2) + "\n")
    write_manifest(out, info)
    return info


def mmdebstrap(recipe: Recipe, root: Path, report: Progress) -> None:
    """The Debian system for `recipe` into directory `root` (from the Debian archive)."""
    argv = ["mmdebstrap", "--variant=minbase", f"--arch={recipe.arch}",
            "--components=main", "--include=" + ",".join(recipe.all_packages()),
            "--aptopt=Acquire::Retries \"3\"",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            recipe.release, str(root), *sources(recipe)]
    lines: list[str] = []

    def line(text: str) -> None:
        lines.append(text)
        if text.startswith(("I: ", "W: ")) or "Unpacking" in text or "Setting up" in text:
            report.detail(text.removeprefix("I: "))

    try:
        procs.stream(argv, line, timeout=3600)
    except procs.CommandError as exc:
        text = "\n".join(lines)
        unknown = re.findall(r"Unable to locate package (\S+)", text)
        unknown += re.findall(r"Package '?(\S+?)'? has no installation candidate", text)
        if unknown:
            raise ConfigError(f"recipe {recipe.name}: unknown package "
                              f"{', '.join(sorted(set(unknown)))} in Debian {recipe.release}/"
                              f"{recipe.arch}") from None
        raise GridvmError(f"mmdebstrap failed: {exc}") from None


def sources(recipe: Recipe) -> list[str]:
    """sources.list lines: the release, and its updates and security suites if it has them."""
    lines = [f"deb {recipe.mirror} {recipe.release} main"]
    if recipe.release not in ("sid", "unstable"):
        lines.append(f"deb {recipe.mirror} {recipe.release}-updates main")
        security = recipe.mirror.rstrip("/").rsplit("/", 1)[0] + "/debian-security"
        if recipe.mirror.rstrip("/").endswith("/debian"):
            lines.append(f"deb {security} {recipe.release}-security main")
    return lines


def chroot(tree: Tree, *argv: str) -> str:
    """Run a command of the built system inside it (only for trees gridvm built)."""
    return procs.run(["chroot", str(tree.root), *argv], timeout=600).stdout.decode()


def configure(tree: Tree, recipe: Recipe, fs_uuid: str, base_dir: Path | None) -> None:
    """Everything the recipe says, as files in the tree (and a few chrooted commands)."""
    tree.write_text("/etc/fstab", f"UUID={fs_uuid}\t/\text4\terrors=remount-ro\t0\t1\n")
    net = recipe.network
    address = None
    if net.mode == "static" and net.address:
        address = ipaddress.IPv4Interface(net.address)
    netconfig.rewrite(tree, netconfig.NetIdentity(
        hostname=recipe.hostname, address=address, gateway=net.gateway,
        dns=tuple(net.dns)))
    for unit in ("systemd-networkd", "systemd-resolved"):
        chroot(tree, "systemctl", "enable", "--quiet", unit)
    _users(tree, recipe)
    for f in recipe.files:
        data = f.content.encode() if f.content is not None else \
            source_path(f, base_dir).read_bytes()
        tree.write_bytes(f.path, data, int(f.mode, 8), _owner(tree, f.owner, f.path))
    guestfiles.install(tree)
    guestfiles.write_first_boot(tree, recipe.first_boot)
    if recipe.first_boot and recipe.services:
        tree.write_text("/etc/systemd/system/gridvm-firstboot.service.d/order.conf",
                        "[Unit]\nBefore=" + " ".join(_unit(s) for s in recipe.services) + "\n")
    for service in recipe.services:
        try:
            chroot(tree, "systemctl", "enable", "--quiet", _unit(service))
        except procs.CommandError:
            raise ConfigError(f"recipe {recipe.name}: service {service!r} does not exist in "
                              "the image (is its package in 'packages'?)") from None
    tree.write_text("/etc/default/gridvm-grub", f'GRIDVM_CMDLINE="{GRUB_CMDLINE}"\n')
    disk.copy_grub_modules(tree)
    chroot(tree, guestfiles.SBIN + "/gridvm-grub")
    sysprep.reset(tree)


def _unit(service: str) -> str:
    return service if "." in service else f"{service}.service"


def _users(tree: Tree, recipe: Recipe) -> None:
    if recipe.root_password_hash:
        chroot(tree, "usermod", "-p", recipe.root_password_hash, "root")
    for user in recipe.users:
        groups = [*user.groups, *(["sudo"] if user.sudo else [])]
        argv = ["useradd", "-m", "-s", user.shell]
        if groups:
            argv += ["-G", ",".join(groups)]
        try:
            chroot(tree, *argv, user.name)
        except procs.CommandError as exc:
            raise ConfigError(f"recipe {recipe.name}: user {user.name}: {exc}") from None
        if user.password_hash:
            chroot(tree, "usermod", "-p", user.password_hash, user.name)
        if user.ssh_keys:
            uid, gid = _owner(tree, user.name, user.name)
            home = f"/home/{user.name}" if user.name != "root" else "/root"
            os.chown(tree.mkdir(f"{home}/.ssh", 0o700), uid, gid)
            tree.write_text(f"{home}/.ssh/authorized_keys", "\n".join(user.ssh_keys) + "\n",
                            0o600, (uid, gid))
        if user.sudo:
            tree.write_text(f"/etc/sudoers.d/90-{user.name}",
                            f"{user.name} ALL=(ALL) NOPASSWD:ALL\n", 0o440)


def _owner(tree: Tree, spec: str, what: str) -> tuple[int, int]:
    """`user:group` (names or numbers) -> ids, from the tree's own passwd and group files."""
    user, _, group = spec.partition(":")

    def lookup(table: str, name: str) -> int:
        if name.isdigit():
            return int(name)
        for line in tree.read_text(table, default="").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[0] == name:
                return int(fields[2])
        raise ConfigError(f"{what}: unknown {'user' if 'passwd' in table else 'group'} "
                          f"{name!r} in the image")

    uid = lookup("/etc/passwd", user or "root")
    if group:
        return uid, lookup("/etc/group", group)
    for line in tree.read_text("/etc/passwd", default="").splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[2] == str(uid):
            return uid, int(fields[3])
    return uid, 0


def newest_kernel(tree: Tree) -> str:
    """The newest kernel version in /boot that has an initrd."""
    found = [p.name.removeprefix("vmlinuz-") for p in tree.resolve("/boot").glob("vmlinuz-*")]
    found = [v for v in found if tree.is_file(f"/boot/initrd.img-{v}")]
    if not found:
        raise GridvmError("the built system has no kernel with an initrd in /boot")
    return sorted(found, key=_version_key)[-1]


def _version_key(v: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]


def _os_name(tree: Tree) -> str:
    text = tree.read_text("/etc/os-release", default="")
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.M)
    return m.group(1) if m else ""
