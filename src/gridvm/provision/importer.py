"""Import a known-good install ("the hard way"): a directory, a tarball or a disk image.

The system is copied into a scratch tree (`cp -a`; `tar -x`; a disk image's root
filesystem — and a separate /boot — with debugfs, no mounts), checked to be a system,
reset as virt-sysprep does (`sysprep`), given its new network identity in the formats it
uses (`netconfig`), gridvm's identity script (so clones of it get their own), a root entry
by UUID in /etc/fstab and a GRUB menu for its kernels; then the same disk layout as built
images: msdos label, ext4 (ext3 for Red Hat 5 era systems), GRUB in the MBR gap, qcow2.
Nothing in the imported system is executed on the host.
"""

from __future__ import annotations

import re
import shutil
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from gridvm.errors import ConfigError, GridvmError, NotFound
from gridvm.host import procs
from gridvm.images.store import ImageInfo, get_image, write_manifest
from gridvm.provision import disk, diskread, guestfiles, netconfig, staging, sysprep
from gridvm.provision.debian import Progress, QuietProgress, need_tools
from gridvm.provision.recipe import parse_size
from gridvm.provision.tree import Tree

GRUB_ARGS = "ro console=tty0 console=ttyS0,115200 no_timer_check"
RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release", "/etc/redhat-release",
                 "/etc/debian_version", "/etc/SuSE-release", "/etc/lsb-release")
INITS = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/bin/sh")
ELF_MACHINES = {3: "i386", 62: "amd64"}
PHASES = ("copying the system", "identity and network", "filesystem and GRUB", "qcow2")


class SourceError(GridvmError):
    """The source cannot be imported as a system."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: str
    initrd: str | None


def import_system(images_dir: Path, source: Path, name: str, ident: netconfig.NetIdentity, *,
                  size: str | None = None, fs_type: str = "auto",
                  progress: Progress | None = None) -> ImageInfo:
    """Import `source` as image `name` (atomic: nothing is left behind on failure)."""
    report = progress or QuietProgress()
    images_dir = Path(images_dir).absolute()
    staging.check_name(name)
    if not source.exists():
        raise NotFound(f"import source {source} does not exist")
    if fs_type not in ("auto", "ext3", "ext4"):
        raise ConfigError(f"--fs {fs_type!r}: expected ext3 or ext4")
    need_tools("sfdisk", "mkfs.ext4", "grub-mkimage", "qemu-img", "debugfs", "tar")
    with staging.staged(images_dir, name, replace=False) as work:
        report.phase(1, len(PHASES), f"copying {source}")
        root = work / "root"
        copy_in(source, root, report)
        tree = Tree(root)
        check_system(tree, source)
        kernels = find_kernels(tree)
        report.phase(2, len(PHASES), "resetting identity, writing the network")
        fs = fs_type if fs_type != "auto" else ("ext3" if is_old_redhat(tree) else "ext4")
        fs_uuid = str(uuidlib.uuid4())
        prepare(tree, ident, kernels, fs_uuid, fs)
        used = _du(root)
        total = parse_size(size) if size else max(2 << 30, _round(used * 3 // 2 + (512 << 20)))
        need = used * 11 // 10 + (16 << 20)
        if total < need:
            raise ConfigError(f"--size {size}: the system needs at least {need >> 20} MiB")
        kernel = kernels[0]
        out = work / "out"
        shutil.copyfile(tree.resolve(kernel.vmlinuz), out / "vmlinuz")
        if kernel.initrd:
            shutil.copyfile(tree.resolve(kernel.initrd), out / "initrd.img")
        else:
            (out / "initrd.img").write_bytes(b"")
        os_name = os_release(tree)
        arch = elf_arch(tree)
        agent = any(tree.exists(p) for p in ("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga"))
        cloud = tree.exists("/usr/bin/cloud-init")
        args = _args(tree)
        report.phase(3, len(PHASES), f"{fs} filesystem and GRUB ({total >> 20} MiB)")
        raw = work / "disk.raw"
        disk.make_boot_disk(raw, root, total, uuid=fs_uuid, fs_type=fs)
        shutil.rmtree(root)
        report.phase(4, len(PHASES), "converting to qcow2")
        disk.to_qcow2(raw, out / "disk.qcow2")
        info = ImageInfo(
            name=name, kernel=out / "vmlinuz", ramdisk=out / "initrd.img",
            disk=out / "disk.qcow2", cmdline=f"root=UUID={fs_uuid} {args}",
            kernel_version=kernel.version, recipe="", kind="import", arch=arch,
            disk_format="qcow2", root=f"UUID={fs_uuid}", os=os_name, agent=agent,
            cloud_init=cloud, virtual_size=total - total % (1 << 20))
        (out / "import.txt").write_text(f"source: {source.absolute()}\n")
        write_manifest(out, info)
    return get_image(images_dir, name)


def _round(n: int) -> int:
    step = 256 << 20
    return -(-n // step) * step


def _du(root: Path) -> int:
    out = procs.run(["du", "-sb", "--apparent-size", str(root)], timeout=600).stdout.decode()
    return int(out.split()[0])


# ----- getting the system --------------------------------------------------------------------


def copy_in(source: Path, root: Path, report: Progress) -> None:
    """The system at `source` (directory, tarball, or disk image) into directory `root`."""
    if source.is_dir():
        root.mkdir()
        procs.run(["cp", "-a", "--no-dereference", f"{source}/.", str(root)], timeout=3600)
        return
    if _is_tar(source):
        root.mkdir()
        try:
            procs.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(source)],
                      timeout=3600)
        except procs.CommandError as exc:
            raise SourceError(f"{source}: cannot unpack: {exc}") from None
        return
    _from_disk(source, root, report)


def _is_tar(path: Path) -> bool:
    if re.search(r"\.(tar|tgz|txz|tbz2?|tar\.(gz|xz|bz2|zst))$", path.name):
        return True
    with path.open("rb") as f:
        head = f.read(512)
    return head[257:262] == b"ustar"


def _from_disk(source: Path, root: Path, report: Progress) -> None:
    """The root filesystem of a disk image (and a separate /boot partition into /boot)."""
    try:
        views = diskread.DiskViews(source)
    except procs.CommandError as exc:
        raise SourceError(f"{source} is not a directory, tarball or disk image: {exc}") \
            from None
    with views:
        parts: list[diskread.Partition | None] = [*views.partitions()] or [None]
        root_part = boot_part = None
        for part in parts:
            reader = views.reader(part)
            if reader is None:
                continue
            if reader.exists("/etc") and any(reader.exists(p) for p in INITS):
                root_part = root_part or (part, reader)
            elif any(reader.exists(f"/{k}") for k in ("grub", "grub2")) or \
                    _has_kernel_top(reader):
                boot_part = boot_part or (part, reader)
        if root_part is None:
            raise SourceError(f"{source}: no partition holds a Linux system "
                               "(ext2/3/4 with /etc and an init)")
        report.detail("copying the root filesystem (debugfs)")
        root_part[1].copy_tree(root)
        if boot_part is not None and boot_part is not root_part:
            report.detail("copying the /boot filesystem (debugfs)")
            boot = root / "boot"
            boot.mkdir(exist_ok=True)
            boot_part[1].copy_tree(boot)


def _has_kernel_top(reader: diskread.ExtReader) -> bool:
    return any(n.startswith("vmlinuz-") for n in reader.listdir("/"))


def check_system(tree: Tree, source: Path) -> None:
    if not tree.is_dir("/etc") or not any(tree.exists(p) for p in RELEASE_FILES):
        raise SourceError(f"{source} is not a system: no /etc/os-release, "
                           "/etc/redhat-release or /etc/debian_version")
    if not any(tree.exists(p) for p in INITS):
        raise SourceError(f"{source} is not a system: no /sbin/init or /bin/sh")


def find_kernels(tree: Tree) -> list[Kernel]:
    """Kernels in /boot with their initrds, newest first."""
    found = []
    for path in tree.files("/boot", "vmlinuz-*"):
        version = path.rsplit("vmlinuz-", 1)[1]
        initrd = next((p for p in (f"/boot/initrd.img-{version}", f"/boot/initramfs-{version}.img",
                                   f"/boot/initrd-{version}.img") if tree.is_file(p)), None)
        found.append(Kernel(version, path, initrd))
    if not found:
        raise SourceError("the system has no kernel in /boot (vmlinuz-*): install one in it "
                           "first (Debian: linux-image-amd64)")
    return sorted(found, key=lambda k: [int(p) if p.isdigit() else 0
                                        for p in re.split(r"[.-]", k.version)], reverse=True)


def is_old_redhat(tree: Tree) -> bool:
    """Red Hat / Scientific Linux 5 and older: their kernels predate ext4."""
    m = re.search(r"release (\d+)", tree.read_text("/etc/redhat-release", default=""))
    return bool(m and int(m.group(1)) <= 5)


def os_release(tree: Tree) -> str:
    text = tree.read_text("/etc/os-release", default="") or \
        tree.read_text("/usr/lib/os-release", default="")
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.M)
    if m:
        return m.group(1)
    return tree.read_text("/etc/redhat-release", default="").strip() or "Linux"


def elf_arch(tree: Tree) -> str:
    """amd64 or i386, from the ELF header of the system's /bin/sh."""
    try:
        head = tree.resolve("/bin/sh").read_bytes()[:20]
    except OSError:
        return "amd64"
    if head[:4] != b"\x7fELF":
        return "amd64"
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), "amd64")


# ----- making it gridvm's ------------------------------------------------------------------


def _args(tree: Tree) -> str:
    """Kernel arguments: serial console, and eth0 naming for systemd-era systems."""
    extra = " net.ifnames=0" if guestfiles.uses_systemd(tree) else ""
    return GRUB_ARGS + extra


def prepare(tree: Tree, ident: netconfig.NetIdentity, kernels: list[Kernel], fs_uuid: str,
            fs: str) -> None:
    """Reset, re-address, add gridvm's scripts, fstab and a GRUB menu (all as files)."""
    sysprep.reset(tree)
    netconfig.rewrite(tree, ident)
    guestfiles.install(tree, grub_hooks=tree.is_dir("/etc/kernel/postinst.d"))
    if tree.is_dir("/etc/kernel/postinst.d"):
        tree.write_text("/etc/default/gridvm-grub", f'GRIDVM_CMDLINE="{_args(tree)}"\n')
    write_fstab(tree, fs_uuid, fs)
    disk.copy_grub_modules(tree)
    tree.write_text("/boot/grub/grub.cfg", grub_cfg(kernels, fs_uuid, _args(tree),
                                                    os_release(tree)))


def write_fstab(tree: Tree, fs_uuid: str, fs: str) -> None:
    """/ by UUID; entries for other block devices go (the import is one filesystem)."""
    kept = []
    for line in tree.read_text("/etc/fstab", default="").splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            kept.append(line)
            continue
        spec = fields[0]
        if spec.startswith(("UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/")):
            kept.append(f"# {line}    # gridvm import: not on the imported disk")
            continue
        kept.append(line)
    kept.insert(0, f"UUID={fs_uuid}\t/\t{fs}\terrors=remount-ro\t0\t1")
    tree.write_text("/etc/fstab", "\n".join(kept) + "\n")


def grub_cfg(kernels: list[Kernel], fs_uuid: str, args: str, title: str) -> str:
    """A GRUB 2 menu like gridvm-grub's: each kernel, newest first."""
    lines = ["# written by gridvm image import", "set default=0", "set timeout=1",
             "serial --unit=0 --speed=115200", "terminal_input serial console",
             "terminal_output serial console"]
    title = re.sub(r"['\\$\n]", "", title)
    for k in kernels:
        lines += [f"menuentry '{title}, with Linux {k.version}' --id 'gridvm-{k.version}' {{",
                  "\tinsmod part_msdos", "\tinsmod ext2",
                  f"\tsearch --no-floppy --fs-uuid --set=root {fs_uuid}",
                  f"\tlinux\t{k.vmlinuz} root=UUID={fs_uuid} {args}"]
        if k.initrd:
            lines.append(f"\tinitrd\t{k.initrd}")
        lines.append("}")
    return "\n".join(lines) + "\n"
