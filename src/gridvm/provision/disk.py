"""Bootable disk images built without mounts or loop devices.

Layout: an msdos partition table (sfdisk on the image file), one bootable Linux partition
at 1 MiB filled from a directory tree by `mkfs.ext4 -E offset=… -d TREE` (ext3 for old
guests), and GRUB for BIOS written the way `grub-install` would, but into the file itself:
GRUB's `boot.img` in the MBR (boot code only; the partition table stays) and a `core.img`
made by `grub-mkimage -O i386-pc` in the gap between the MBR and the partition. core.img's
first sector (diskboot) already lists the sectors that follow it (grub-mkimage fills in
the length; the start is sector 2), so nothing needs patching: SeaBIOS loads the MBR, the
MBR loads sector 1, sector 1 loads the rest. An embedded early config finds the root
filesystem by UUID and reads /boot/grub/grub.cfg from it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from gridvm.host import procs
from gridvm.provision.tree import Tree

SECTOR = 512
PART_START = 2048                    # sectors: 1 MiB, where the root partition starts
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
MBR_CODE = 440                       # boot code; the disk signature and table follow
CORE_MODULES = ("biosdisk", "part_msdos", "ext2", "search", "search_fs_uuid", "normal", "linux",
                "configfile", "serial", "terminal", "gzio", "echo", "test", "minicmd")
EARLY_CFG = """\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root {uuid}
set prefix=($root)/boot/grub
"""


class DiskError(procs.CommandError):
    """A disk image could not be built or read."""


def copy_grub_modules(tree: Tree) -> None:
    """GRUB's i386-pc modules into the tree's /boot/grub/i386-pc (for `insmod`)."""
    dest = tree.mkdir("/boot/grub/i386-pc")
    for mod in GRUB_DIR.iterdir():
        if mod.suffix in (".mod", ".lst"):
            shutil.copyfile(mod, dest / mod.name)


def make_fs_image(out: Path, root: Path, size: int, *, uuid: str, label: str,
                  fs_type: str = "ext4", offset: int = 0) -> None:
    """Make an ext2/3/4 filesystem of `size` bytes at `offset` in `out`, filled from `root`."""
    if fs_type not in ("ext2", "ext3", "ext4"):
        raise DiskError(f"unsupported filesystem type {fs_type!r}")
    argv = [f"mkfs.{fs_type}", "-q", "-F", "-d", str(root), "-L", label, "-U", uuid]
    if offset:
        argv += ["-E", f"offset={offset}"]
    if fs_type != "ext4":
        argv += ["-I", "128"]  # inode size old kernels (and GRUB legacy) read
    argv += [str(out), f"{size // 1024}k"]
    try:
        procs.run(argv, timeout=1800)
    except procs.CommandError as exc:
        if "Could not allocate block" in str(exc) or "No space left" in str(exc):
            raise DiskError(f"the disk is too small for the system ({size >> 20} MiB): "
                            "give a larger disk size") from None
        raise DiskError(str(exc)) from None


def make_boot_disk(out: Path, root: Path, size: int, *, uuid: str, label: str = "gridvm-root",
                   fs_type: str = "ext4") -> None:
    """A raw disk: msdos label, partition 1 (bootable) from `root`, GRUB in the MBR gap."""
    size -= size % (1 << 20)
    with out.open("wb") as f:
        f.truncate(size)
    procs.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(out)],
              input=f"label: dos\nstart={PART_START}, type=83, bootable\n".encode())
    part_bytes = size - PART_START * SECTOR
    make_fs_image(out, root, part_bytes, uuid=uuid, label=label, fs_type=fs_type,
                  offset=PART_START * SECTOR)
    install_grub(out, uuid)


def install_grub(disk: Path, uuid: str, modules: Iterable[str] = CORE_MODULES) -> None:
    """Write GRUB's boot.img and a fresh core.img into a raw disk (no mounts, no loop)."""
    boot_img = GRUB_DIR / "boot.img"
    if not boot_img.is_file():
        raise DiskError(f"{boot_img} is missing: install grub-pc-bin (scripts/setup.sh)")
    work = disk.parent / f".{disk.name}.grub"
    work.mkdir(exist_ok=True)
    try:
        early = work / "early.cfg"
        early.write_text(EARLY_CFG.format(uuid=uuid))
        core = work / "core.img"
        procs.run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-c", str(early),
                   "-p", "/boot/grub", "-o", str(core), *modules], timeout=60)
        core_bytes = core.read_bytes()
        if len(core_bytes) > (PART_START - 1) * SECTOR:
            raise DiskError(f"GRUB's core.img ({len(core_bytes)} bytes) does not fit before "
                            "the first partition")
        code = boot_img.read_bytes()[:MBR_CODE]
        fd = os.open(disk, os.O_WRONLY)
        try:
            os.pwrite(fd, code, 0)
            os.pwrite(fd, core_bytes, SECTOR)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def to_qcow2(raw: Path, out: Path) -> None:
    """qemu-img convert raw -> qcow2 (unallocated space stays unallocated)."""
    procs.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
              timeout=1800)


def allocated_bytes(path: Path) -> int:
    """Bytes a (sparse) file really uses on disk."""
    return path.stat().st_blocks * 512
