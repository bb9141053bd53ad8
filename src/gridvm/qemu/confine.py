"""What a confined QEMU is given instead of paths.

A confined QEMU runs as an unprivileged uid under seccomp and cannot reach gridvmd's
directories by path. It inherits its run directory as a descriptor N (so run-dir files are
`/proc/self/fd/N/NAME`, which resolves without searching the directories above),
its disks as fd sets (`-add-fd`, `/dev/fdset/N`, backing files too), and kernel and
initrd as inherited descriptors. Anything else, by path, is refused by the kernel.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@functools.cache
def has_sandbox(binary: str) -> bool:
    """Whether `binary` was built with seccomp (`-sandbox` in its help)."""
    try:
        out = subprocess.run([binary, "-help"], capture_output=True, timeout=20,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"-sandbox" in out


def in_rundir(dirfd: int, name: str) -> str:
    """The path of run-dir file `name` as a confined QEMU opens it."""
    return f"/proc/self/fd/{dirfd}/{name}"


def rundir_fd(argv: list[str]) -> int | None:
    """The run-dir descriptor of a confined QEMU, from its command line (None: unconfined)."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-qmp" and value.startswith("unix:/proc/self/fd/"):
            return int(value.split("/")[4])
    return None


@dataclass(frozen=True)
class DiskFds:
    """One disk as fd sets: the image's set and one per backing layer (top down).

    The image's own file node runs with `locking=off`: QEMU 7.2 switches a writable image
    between its read-only and read-write descriptors as permissions change (a mirror job
    does), and with two descriptors from an fd set its lock check then fails against its
    own locks and aborts. gridvmd takes QEMU's locks for it instead, on the read-write
    descriptor QEMU keeps (gridvm.host.confine.lock_writer)."""

    fdset: int
    backing: list[tuple[int, str]] = field(default_factory=list)   # (fdset, format)
    block: bool = False

    def drive_opts(self) -> dict[str, object]:
        """`-drive` options (file= and backing overrides) for this disk."""
        opts: dict[str, object] = {"file": f"/dev/fdset/{self.fdset}"}
        if self.block:
            opts["file.driver"] = "host_device"
        opts["file.locking"] = "off"
        prefix = "backing."
        for fdset, fmt in self.backing:
            opts[prefix + "driver"] = fmt
            opts[prefix + "file.filename"] = f"/dev/fdset/{fdset}"
            prefix += "backing."
        return opts

    def blockdev_file(self) -> dict[str, object]:
        """The `file` and `backing` members of a blockdev-add for this disk."""
        out: dict[str, object] = {"file": {
            "driver": "host_device" if self.block else "file",
            "filename": f"/dev/fdset/{self.fdset}", "aio": "threads", "locking": "off"}}
        node = out
        for fdset, fmt in self.backing:
            child: dict[str, object] = {"driver": fmt, "read-only": True, "file": {
                "driver": "file", "filename": f"/dev/fdset/{fdset}"}}
            node["backing"] = child
            node = child
        return out


@dataclass
class Confined:
    """The descriptors of one confined launch: fd sets by number (fd, opaque label), the
    disks by vdev, kernel and initrd paths as QEMU opens them."""

    rundir: Path
    dirfd: int
    sandbox: bool = True
    inherit: dict[int, str] = field(default_factory=dict)   # kernel, initrd: fd -> path
    fdsets: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    disks: dict[str, DiskFds] = field(default_factory=dict)
    kernel: str | None = None
    ramdisk: str | None = None

    def add(self, fd: int, label: str, fdset: int | None = None) -> int:
        """Put `fd` in fd set `fdset` (a new one if None); return the set's id."""
        if fdset is None:
            fdset = max(self.fdsets, default=0) + 1
        self.fdsets.setdefault(fdset, []).append((fd, label))
        return fdset

    def run(self, name: str) -> str:
        return in_rundir(self.dirfd, name)

    @property
    def fds(self) -> list[int]:
        """Every descriptor QEMU inherits."""
        return [self.dirfd, *self.inherit,
                *(fd for members in self.fdsets.values() for fd, _ in members)]

    def args(self) -> list[str]:
        """`-sandbox`, the run-dir marker (re-adoption finds QEMU by its run dir), labels
        of the inherited files and `-add-fd` for every fd set (-add-fd moves a descriptor:
        the inherited kernel and initrd cannot be in sets)."""
        argv = ["-sandbox", SANDBOX] if self.sandbox else []
        argv += ["-object", f"secret,id=gridvm-rundir,data={str(self.rundir).replace(',', ',,')}"]
        for fd, path in sorted(self.inherit.items()):     # labels (see standalone_argv)
            argv += ["-object", f"secret,id=gridvm-fd{fd},data={path.replace(',', ',,')}"]
        for fdset, members in sorted(self.fdsets.items()):
            for fd, label in members:
                argv += ["-add-fd", f"fd={fd},set={fdset},opaque={label.replace(',', ',,')}"]
        return argv


def standalone_argv(argv: list[str]) -> list[str]:
    """A confined QEMU's command line with paths for its descriptors again (for running
    it by hand, as the benchmarks do): fd sets and inherited files by their labels, run-dir
    files under the run dir; no -add-fd, -sandbox or run-dir marker."""
    labels: dict[str, str] = {}
    rundir = ""
    out: list[str] = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-add-fd":
            opts = dict(o.partition("=")[::2] for o in value.replace(",,", "\0").split(","))
            label = opts.get("opaque", "").replace("\0", ",")
            labels[f"/dev/fdset/{opts['set']}"] = labels[f"/proc/self/fd/{opts['fd']}"] = label
        elif flag == "-object" and value.startswith("secret,id=gridvm-rundir,data="):
            rundir = value.split("data=", 1)[1].replace(",,", ",")
        elif flag == "-object" and value.startswith("secret,id=gridvm-fd"):
            fd = value.split(",", 2)[1].removeprefix("id=gridvm-fd")
            labels[f"/proc/self/fd/{fd}"] = value.split("data=", 1)[1].replace(",,", ",")
    dirfd = rundir_fd(argv)
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg in ("-add-fd", "-sandbox") or (arg == "-object" and "id=gridvm-" in nxt):
            skip = True
            continue
        if dirfd is not None:
            arg = arg.replace(f"/proc/self/fd/{dirfd}/", rundir.replace(",", ",,") + "/")
        if arg in labels:                # a whole path (-kernel): no option escaping
            out.append(labels[arg])
            continue
        for fdpath, label in labels.items():
            arg = re.sub(re.escape(fdpath) + r"(?![0-9])",
                         label.replace(",", ",,").replace("\\", "\\\\"), arg)
        out.append(arg)
    return out
