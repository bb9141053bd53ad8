"""A lab host as a separate machine: its own mount namespace beside its network namespace.

Inside it the host sees a private `/tmp` and `/run/gridvm` (tmpfs, like a machine's own),
and of the lab's directory only its own home and the shared-storage directory (the lab's
stand-in for NFS): the other hosts' homes, sockets and files, the lab's CA and etcd are not
there. The namespace is pinned on a file (`unshare --mount=FILE`), so gridvmd restarts enter
the same machine; a power-off drops it (a rebooted machine starts with empty /tmp and /run).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import gridvm
from gridvm.errors import GridvmError
from gridvm.host import procs
from gridvm.host.networks import RUN_ROOT

PIN_DIR = RUN_ROOT / "labs" / "mnt"
STAGE = Path("/run") / "gridvm-stage"


def pin(name: str) -> Path:
    return PIN_DIR / name


def exists(name: str) -> bool:
    path = pin(name)
    return path.exists() and _mounted(path)


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _private_pin_dir() -> None:
    """The pins live on a private mount, so no namespace sees its own pin (no loops)."""
    PIN_DIR.mkdir(parents=True, exist_ok=True)
    if not _mounted(PIN_DIR):
        procs.run(["mount", "--bind", str(PIN_DIR), str(PIN_DIR)])
    procs.run(["mount", "--make-private", str(PIN_DIR)])


def software() -> list[Path]:
    """Where gridvm itself runs from: its checkout (with the web assets) or installed
    package, and the Python environment. Kept visible in every machine: a checkout under
    /tmp would otherwise vanish behind the machine's private /tmp."""
    package = Path(gridvm.__file__).resolve().parent
    root = next((d for d in package.parents if (d / "pyproject.toml").is_file()),
                package.parent)
    keep = [root]
    prefix = Path(sys.prefix).resolve()
    if not prefix.is_relative_to(root):
        keep.append(prefix)
    return keep


def create(name: str, *, own: list[Path], shared: list[Path], hide: Path) -> Path:
    """Make and pin the mount namespace of machine `name`: `hide` (the lab's directory) is
    an empty tmpfs there except for `own` and `shared` directories, bound at their paths;
    /tmp is private except for gridvm's own files (`software`)."""
    if exists(name):
        return pin(name)
    _private_pin_dir()
    path = pin(name)
    path.touch()
    stage = STAGE / name
    # gridvm's own files first (outermost), then the lab's directory hidden, then what this
    # machine may see of it: a lab inside the checkout stays hidden.
    keep = [d for d in software() if d.is_relative_to("/tmp") or d.is_relative_to(hide)]
    outer = len(keep)
    keep += [d for d in (*own, *shared) if d.is_dir()]
    lines = ["set -e", f"rm -rf {shlex.quote(str(stage))}"]
    for i, d in enumerate(keep):
        lines += [f"mkdir -p {stage}/{i}", f"mount --bind {shlex.quote(str(d))} {stage}/{i}"]
    lines += ["mount -t tmpfs -o mode=1777 gridvm-tmp /tmp"]

    def restore(i: int, d: Path) -> list[str]:
        where = shlex.quote(str(d))
        return [f"mkdir -p {where}", f"mount --move {stage}/{i} {where}"]

    for i, d in enumerate(keep[:outer]):
        lines += restore(i, d)
    lines += [f"mkdir -p {shlex.quote(str(hide))}",
              f"mount -t tmpfs -o mode=0755 gridvm-lab {shlex.quote(str(hide))}"]
    for i, d in enumerate(keep[outer:], start=outer):
        lines += restore(i, d)
    lines += [f"mkdir -p {RUN_ROOT}", f"mount -t tmpfs -o mode=0755 gridvm-run {RUN_ROOT}",
              f"rm -rf {shlex.quote(str(stage))}"]
    try:
        procs.run(["unshare", f"--mount={path}", "--propagation", "slave",
                   "sh", "-c", "\n".join(lines)], timeout=30)
    except procs.CommandError as exc:
        with contextlib.suppress(GridvmError):
            remove(name)
        raise GridvmError(f"cannot make the mount namespace of {name}: {exc}") from None
    return path


def enter(name: str) -> list[str]:
    """argv prefix that runs a command on machine `name` (in its mount namespace)."""
    if not exists(name):
        raise GridvmError(f"machine {name} has no mount namespace (is its lab up?)")
    return ["nsenter", f"--mount={pin(name)}", "--"]


def remove(name: str) -> None:
    """Drop the pin: the namespace goes once no process is left in it (idempotent)."""
    path = pin(name)
    if path.exists() and _mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    path.unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(STAGE / name)], check=False)


def same_machine(pid: int, name: str) -> bool:
    """Is process `pid` inside machine `name`'s mount namespace?"""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(pin(name)).st_ino
    except OSError:
        return False
