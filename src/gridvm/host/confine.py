"""Confined QEMU: one unprivileged uid per domain, its files handed over as descriptors.

gridvmd starts each QEMU already unprivileged (uid = gid = one of a reserved range, no
supplementary groups but `kvm` when it uses KVM), under QEMU's seccomp sandbox. QEMU 7.2
applies its sandbox before `-runas` and `-daemonize` (so `elevateprivileges=deny` and
`spawn=deny` would kill them): gridvmd drops the privileges itself, as libvirt does, and
starts QEMU detached. QEMU gets its run directory (owned by its uid, 0700) as an inherited
descriptor, its disks and their backing files as fd sets, kernel and initrd as
descriptors; taps are made owned by its uid. A uid is claimed host-wide (across gridvmd
homes) by a file in CLAIMS; a claim whose uid runs no process and is older than a
launch is stale and taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import json
import logging
import os
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gridvm.config.model import DiskSpec, DomainConfig
from gridvm.errors import Conflict, GridvmError, QemuError
from gridvm.host import procs
from gridvm.qemu.confine import Confined, DiskFds, has_sandbox
from gridvm.qemu.qmp import Monitor

log = logging.getLogger("gridvm.confine")

CLAIMS = Path(os.environ.get("GRIDVM_QEMU_CLAIMS", "/run/gridvm/qemu-uids"))


def uid_range() -> range:
    """The uids reserved for QEMUs: $GRIDVM_QEMU_UIDS (`FIRST:COUNT`), else 1500000000:65536
    (above the subordinate ranges useradd hands out, below nspawn's 0x70000000 pool)."""
    first, _, count = os.environ.get("GRIDVM_QEMU_UIDS", "1500000000:65536").partition(":")
    return range(int(first), int(first) + int(count or 1))


def enabled() -> bool:
    """Confinement is on unless GRIDVM_NO_CONFINE=1 (debugging) or gridvmd is not root."""
    return os.environ.get("GRIDVM_NO_CONFINE", "") not in ("1", "yes") and os.geteuid() == 0


def process_uid(pid: int) -> int | None:
    """The real uid of a running process (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _uids_in_use() -> set[int]:
    used = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            uid = process_uid(int(entry.name))
            if uid is not None:
                used.add(uid)
    return used


LAUNCH_GRACE_S = 120.0


def claim_uid(owner: str) -> int:
    """Claim a free uid of the range for `owner` (home tag + domain uuid)."""
    CLAIMS.mkdir(parents=True, exist_ok=True, mode=0o700)
    running: set[int] | None = None
    for uid in uid_range():
        path = CLAIMS / str(uid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if running is None:
                running = _uids_in_use()
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if uid in running or age < LAUNCH_GRACE_S:
                continue
            path.unlink(missing_ok=True)      # stale: its QEMU is long gone
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        return uid
    raise GridvmError(f"no free QEMU uid left in {uid_range()}")


def release_uid(uid: int | None, owner: str) -> None:
    """Give a claimed uid back (only if `owner` still holds it)."""
    if uid is None:
        return
    path = CLAIMS / str(uid)
    with contextlib.suppress(OSError):
        if path.read_text() == owner:
            path.unlink()


# QEMU's image locks (block/file-posix.c): byte 100+P says "I use permission P", byte 200+P
# "nobody else may use P"; P = 1 is write. Held as OFD locks on an open file description.
_F_OFD_GETLK, _F_OFD_SETLK = 36, 37
_FLOCK = struct.Struct("hhqqixxxx")
_WRITE_USED, _WRITE_DENIED = 101, 201


def lock_writer(fd: int, path: str) -> None:
    """Take QEMU's "writing, others may not write" locks on `fd` (a read-write descriptor a
    confined QEMU inherits: the locks live as long as QEMU holds it), refusing a disk that
    another QEMU or qemu-img is using — what QEMU's own locking would have done."""
    for byte in (_WRITE_USED, _WRITE_DENIED):
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        got = _FLOCK.unpack(fcntl.fcntl(fd, _F_OFD_GETLK, probe))
        if got[0] != fcntl.F_UNLCK:
            raise Conflict(f"disk {path} is in use (another QEMU or qemu-img has it open "
                           "for writing)")
    for byte in (_WRITE_USED, _WRITE_DENIED):
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))


def release_owner(owner: str) -> None:
    """Give back whatever uid `owner` claimed (its QEMU is gone and its uid unknown)."""
    with contextlib.suppress(OSError):
        for path in CLAIMS.iterdir():
            with contextlib.suppress(OSError):
                if path.read_text() == owner:
                    path.unlink()


def _backing_chain(target: str, fmt: str) -> list[tuple[str, str]]:
    """(filename, format) of each backing layer of a qcow2 image, top down (none for an
    image qemu-img cannot read: QEMU then says what is wrong with it)."""
    if fmt != "qcow2":
        return []
    try:
        out = procs.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                         "-f", fmt, target], timeout=60).stdout
    except procs.CommandError:
        return []
    return [(str(layer["filename"]), str(layer.get("format", "raw")))
            for layer in json.loads(out)[1:]]


@dataclass
class Launch:
    """The descriptors gridvmd opens for one confined QEMU; `close` after QEMU has them."""

    uid: int
    rundir: Path
    spec: Confined
    opened: list[int] = field(default_factory=list)

    def _open(self, path: str, flags: int) -> int:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise GridvmError(f"cannot open {path}: {exc.strerror}") from None
        self.opened.append(fd)
        return fd

    def add_disk(self, spec: DiskSpec, *, lock: bool = True) -> None:
        block = Path(spec.target).is_block_device()
        modes = [os.O_RDONLY] if spec.mode == "r" or spec.devtype == "cdrom" else \
            [os.O_RDWR, os.O_RDONLY]
        fdset: int | None = None
        for mode in modes:
            fd = self._open(spec.target, mode)
            if mode == os.O_RDWR and lock:
                lock_writer(fd, spec.target)
            fdset = self.spec.add(fd, spec.target, fdset)
        assert fdset is not None
        backing = []
        for path, fmt in _backing_chain(spec.target, spec.format):
            backing.append((self.spec.add(self._open(path, os.O_RDONLY), path), fmt))
        self.spec.disks[spec.vdev] = DiskFds(fdset, backing, block)

    def boot_file(self, path: str) -> str:
        """A kernel or initrd as QEMU opens it: through an inherited descriptor (a file in
        the run dir, or a copy there of one others may not read, through the run dir's)."""
        p = Path(path).absolute()
        if p.is_relative_to(self.rundir):
            return self.spec.run(str(p.relative_to(self.rundir)))
        if not p.stat().st_mode & 0o004:
            copy = self.rundir / f"boot-{p.name}"
            shutil.copyfile(p, copy)
            os.chown(copy, self.uid, self.uid)
            return self.spec.run(copy.name)
        fd = self._open(str(p), os.O_RDONLY)
        self.spec.inherit[fd] = str(p)
        return f"/proc/self/fd/{fd}"

    def close(self) -> None:
        for fd in self.opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.opened.clear()


TUN = Path("/dev/net/tun")


def _open_tun() -> None:
    """An unprivileged QEMU opens /dev/net/tun to attach to its own taps: the kernel makes
    the node 0666 (attaching needs the tap's ownership); container runtimes that create it
    0600 are put back to that."""
    with contextlib.suppress(OSError):
        if TUN.stat().st_mode & 0o666 != 0o666:
            log.warning("%s is not 0666 (the kernel's default): making it so for unprivileged "
                        "QEMUs", TUN)
            TUN.chmod(0o666)


async def hand_disk(mon: Monitor, target: str, fmt: str, *, writable: bool) -> DiskFds:
    """Give a running confined QEMU an image and its backing files as fd sets (QMP add-fd);
    its blockdev-add then names /dev/fdset/N. Nothing stays open here."""
    block = Path(target).is_block_device()
    chain = await asyncio.to_thread(_backing_chain, target, fmt)
    layers = [(target, [os.O_RDWR, os.O_RDONLY] if writable else [os.O_RDONLY], fmt)]
    layers += [(path, [os.O_RDONLY], f) for path, f in chain]
    sets: list[tuple[int, str]] = []
    for path, modes, f in layers:
        fdset: int | None = None
        for mode in modes:
            try:
                fd = os.open(path, mode | os.O_CLOEXEC)
            except OSError as exc:
                raise GridvmError(f"cannot open {path}: {exc.strerror}") from None
            try:
                if mode == os.O_RDWR:
                    lock_writer(fd, path)
                fdset = await mon.add_fd(fd, path, fdset)
            finally:
                os.close(fd)
        assert fdset is not None
        sets.append((fdset, f))
    return DiskFds(sets[0][0], sets[1:], block)


async def drop_disk(mon: Monitor, fds: DiskFds) -> None:
    """Forget the fd sets of `hand_disk` (after a failed blockdev-add)."""
    for fdset in [fds.fdset, *(f for f, _ in fds.backing)]:
        with contextlib.suppress(QemuError):
            await mon.execute("remove-fd", {"fdset-id": fdset})


async def forget_file(mon: Monitor, path: str) -> None:
    """Close the descriptors QEMU holds for `path` in its fd sets (after a disk left)."""
    try:
        sets = await mon.execute("query-fdsets")
    except QemuError as exc:
        log.warning("cannot list QEMU's fd sets: %s", exc)
        return
    for fdset in sets:
        if any(f.get("opaque") == path for f in fdset.get("fds", [])):
            with contextlib.suppress(QemuError):
                await mon.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})


def give(path: Path, uid: int | None) -> None:
    """A file gridvmd made in a confined QEMU's run dir becomes the QEMU's."""
    if uid is not None:
        os.chown(path, uid, uid)


def prepare(cfg: DomainConfig, rundir: Path, uid: int, binary: str, *,
            lock: bool = True) -> Launch:
    """Give the run dir to `uid` and open everything QEMU needs for `cfg` (its disks and
    boot files); on failure nothing stays open. Without `lock` (a live migration's
    destination, which opens shared disks while the source still writes them) its disks
    carry no write locks."""
    for dirpath, _dirs, files in os.walk(rundir):
        os.chown(dirpath, uid, uid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, uid)
    rundir.chmod(0o700)
    if cfg.vifs:
        _open_tun()
    sandbox = has_sandbox(binary)
    if not sandbox:
        log.warning("%s has no seccomp support: QEMU runs without -sandbox", binary)
    launch = Launch(uid, rundir, Confined(rundir, -1, sandbox=sandbox))
    try:
        launch.spec.dirfd = launch._open(str(rundir), os.O_RDONLY | os.O_DIRECTORY)
        for d in cfg.disks:
            if d.target:
                launch.add_disk(d, lock=lock)
        if cfg.kernel:
            launch.spec.kernel = launch.boot_file(cfg.kernel)
        if cfg.ramdisk:
            launch.spec.ramdisk = launch.boot_file(cfg.ramdisk)
    except BaseException:
        launch.close()
        raise
    return launch


def spawn(argv: list[str], launch: Launch, *, kvm: bool) -> subprocess.Popen[bytes]:
    """Start QEMU as `launch.uid`, detached (its own session), inheriting the opened
    descriptors at their numbers; stdout/stderr go to the run dir's qemu.log."""
    groups = []
    if kvm:
        with contextlib.suppress(KeyError):
            groups.append(grp.getgrnam("kvm").gr_gid)
    logfd = os.open(launch.rundir / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
                    | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(logfd, launch.uid, launch.uid)
        proc = subprocess.Popen(
            argv, user=launch.uid, group=launch.uid, extra_groups=groups,
            pass_fds=launch.spec.fds, start_new_session=True, umask=0o077,
            stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, cwd="/")
    except OSError as exc:
        raise QemuError(f"cannot start QEMU: {exc}") from exc
    finally:
        os.close(logfd)
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return proc


def log_tail(rundir: Path, lines: int = 3) -> str:
    try:
        text = (rundir / "qemu.log").read_text(errors="replace")
    except OSError:
        return "no output"
    return " | ".join(text.strip().splitlines()[-lines:]) or "no output"
