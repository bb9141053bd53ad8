"""One cgroup helper for cgroup v1 and v2: a group per domain for Xen credit-scheduler semantics.

Domain groups live at `<mount>/<parent>/<name>` in each hierarchy used: the
unified one (v2) or the v1 `cpu`, `cpuacct` and `cpuset` hierarchies (which may
be mounted separately or together). The version is chosen at run time: v2 if
the unified hierarchy offers the `cpu` controller, else v1.

Memory groups (v1) nest under the daemon's own memory cgroup rather than the hierarchy's root,
so a limit put on the service still covers its guests. `set_memory_limit` is a hard ceiling on a
QEMU's host memory (guest RAM it touched plus QEMU's own), which Xen enforces by construction.

Xen semantics: `weight` is a relative share (1..65535, default 256) and `cap`
a ceiling in percent of one CPU (0 = none). Calls are blocking file I/O (remove()
may wait up to 2 s for exiting tasks): run them in a worker thread from asyncio code.
"""

from __future__ import annotations

import builtins
import os
import re
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from errno import EBUSY, ESRCH
from pathlib import Path
from typing import Literal

from gridvm.errors import ConfigError, NotFound, ResourceError
from gridvm.host.cpulist import format_cpulist

__all__ = [
    "CFS_PERIOD_US",
    "CgroupError",
    "CgroupManager",
    "CgroupMounts",
    "read_control",
    "write_control",
]

CFS_PERIOD_US = 100_000
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory")
V2_CONTROLLERS = ("cpu", "cpuset", "memory")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}")
_REMOVE_TIMEOUT = 2.0


class CgroupError(ResourceError):
    """A cgroup file operation failed; `errno` is the OS error number, if any."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# --- the outside effects: one helper each ---------------------------------------------------


def write_control(path: Path, value: str) -> None:
    """Write `value` to the cgroup control file `path` (which must exist)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(
            f"cannot write {value!r} to {path}: {exc.strerror}", errno=exc.errno
        ) from exc


def read_control(path: Path) -> str:
    """The content of the cgroup control file `path`, without the trailing newline."""
    try:
        return path.read_text().rstrip("\n")
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}", errno=exc.errno) from exc


def _mkdir(path: Path) -> bool:
    """Create the cgroup directory `path`; False if it already existed."""
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise CgroupError(f"cannot create cgroup {path}: a file has that name") from None
        return False
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}", errno=exc.errno) from exc
    return True


def _rmdir(path: Path) -> None:
    """Remove the (empty) cgroup directory `path`."""
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}", errno=exc.errno) from exc


# --- where the hierarchies are ----------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMounts:
    """Mount points: the unified (v2) hierarchy and each v1 controller's hierarchy."""

    unified: Path | None = None
    v1: Mapping[str, Path] = field(default_factory=dict)

    @classmethod
    def detect(cls, mountinfo: str = "/proc/self/mountinfo") -> CgroupMounts:
        """Read the cgroup mounts of this process's mount namespace."""
        unified: Path | None = None
        v1: dict[str, Path] = {}
        try:
            lines = Path(mountinfo).read_text().splitlines()
        except OSError as exc:
            raise CgroupError(f"cannot read {mountinfo}: {exc.strerror}") from exc
        for line in lines:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            mount_point = Path(_unescape(fields[4]))
            if tail[0] == "cgroup2" and unified is None:
                unified = mount_point
            elif tail[0] == "cgroup":
                for option in tail[2].split(","):
                    v1.setdefault(option, mount_point)
        return cls(unified, v1)


def _unescape(text: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


# --- the manager ------------------------------------------------------------------------------


class CgroupManager:
    """Domain groups under `<mount>/<parent>`; `parent` is a path such as "gridvm/ab12cd".

    `mounts` overrides the detected mount points (for tests on a fake tree).
    """

    version: Literal[1, 2]

    def __init__(self, parent: str = "gridvm", *, mounts: CgroupMounts | None = None) -> None:
        parts = parent.strip("/").split("/")
        if not all(_NAME.fullmatch(part) for part in parts):
            raise ConfigError(f"invalid cgroup parent {parent!r}: use names like gridvm/abc123")
        self.parent = "/".join(parts)
        found = mounts if mounts is not None else CgroupMounts.detect()
        unified = found.unified
        if unified is not None and "cpu" in self._controllers(unified):
            self.version = 2
            self._roots: dict[str, Path] = {c: unified for c in V2_CONTROLLERS}
        elif "cpu" in found.v1:
            self.version = 1
            self._roots = {c: found.v1[c] for c in V1_CONTROLLERS if c in found.v1}
        else:
            raise CgroupError("no cgroup hierarchy with the cpu controller is mounted")
        # distinct hierarchies, the one holding "cpu" first
        self._mounts = list(
            dict.fromkeys(self._roots[c] for c in V1_CONTROLLERS if c in self._roots)
        )
        # where the parent group is made in each hierarchy: its root, except v1 memory
        self._base: dict[Path, Path] = {m: m for m in self._mounts}
        memory = self._roots.get("memory")
        if self.version == 1 and mounts is None and memory not in (None, self._roots["cpu"]):
            assert memory is not None
            self._base[memory] = memory / own_cgroup("memory").lstrip("/")

    # -- public API --

    def create(self, name: str) -> None:
        """Create the group `name` in every hierarchy (idempotent; undone if it fails)."""
        _check_name(name)
        existed = self.exists(name)
        try:
            for mount in self._mounts:
                self._create_in(mount, name)
        except CgroupError:
            if not existed:
                with suppress(CgroupError):
                    self.remove(name)
            raise

    def attach(self, name: str, pid: int) -> None:
        """Move process `pid` with all its threads into the group."""
        dirs = self._dirs(name, require_all=True)
        for path in dirs:
            try:
                write_control(path / "cgroup.procs", str(pid))
            except CgroupError as exc:
                if exc.errno == ESRCH:
                    raise NotFound(f"no process {pid} to put into cgroup {name!r}") from exc
                raise

    def set_weight(self, name: str, weight: int) -> None:
        """Xen credit weight (1..65535; 256 is the default share)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 65535:
            raise ConfigError(f"invalid weight {weight!r}: must be an integer from 1 to 65535")
        if self.version == 1:
            write_control(self._dir("cpu", name) / "cpu.shares", str(_clamp(weight * 4, 2, 262144)))
        else:
            value = _clamp(round(weight * 100 / 256), 1, 10000)
            write_control(self._dir("cpu", name) / "cpu.weight", str(value))

    def set_cap(self, name: str, cap_percent: int) -> None:
        """Xen credit cap: at most `cap_percent`% of one CPU (100 = one CPU, 0 = no cap)."""
        if isinstance(cap_percent, bool) or not isinstance(cap_percent, int) or cap_percent < 0:
            raise ConfigError(f"invalid cap {cap_percent!r}: must be an integer >= 0 (0 = none)")
        path = self._dir("cpu", name)
        quota = cap_percent * CFS_PERIOD_US // 100
        if self.version == 1:
            write_control(path / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            write_control(path / "cpu.cfs_quota_us", str(quota) if cap_percent else "-1")
        else:
            limit = str(quota) if cap_percent else "max"
            write_control(path / "cpu.max", f"{limit} {CFS_PERIOD_US}")

    def set_cpus(self, name: str, cpus: Iterable[int]) -> None:
        """Restrict the group to the CPUs `cpus` (cpuset.cpus)."""
        chosen = frozenset(cpus)
        if not chosen:
            raise ConfigError(f"cannot pin cgroup {name!r} to an empty set of CPUs")
        path = self._dir("cpuset", name)
        if not (path / "cpuset.cpus").exists():
            raise CgroupError(f"the cpuset controller is not available in {path}")
        if self.version == 1:
            self._inherit_cpuset(path, "cpuset.mems")
        write_control(path / "cpuset.cpus", format_cpulist(chosen))

    def set_memory_limit(self, name: str, limit_bytes: int | None) -> None:
        """Hard ceiling on the group's memory (None = none); reclaims down to it at once."""
        if limit_bytes is not None and (isinstance(limit_bytes, bool) or limit_bytes < 1 << 20):
            raise ConfigError(f"invalid memory limit {limit_bytes!r}: at least 1 MiB")
        path = self._dir("memory", name)
        if self.version == 1:
            value = str(limit_bytes) if limit_bytes is not None else "-1"
            write_control(path / "memory.limit_in_bytes", value)
        else:
            write_control(path / "memory.max", str(limit_bytes or "max"))

    def memory_bytes(self, name: str) -> int:
        """Memory charged to the group now (bytes)."""
        control = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int(read_control(self._dir("memory", name) / control))

    def cpu_usage_ns(self, name: str) -> int:
        """CPU time consumed by the group so far, in nanoseconds."""
        if self.version == 1:
            return int(read_control(self._dir("cpuacct", name) / "cpuacct.usage"))
        for line in read_control(self._dir("cpu", name) / "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        raise CgroupError(f"no usage_usec in {self._dir('cpu', name) / 'cpu.stat'}")

    def pids(self, name: str) -> builtins.list[int]:
        """Processes (thread group ids) in the group."""
        text = read_control(self._dir("cpu", name) / "cgroup.procs")
        return sorted(int(pid) for pid in text.split())

    def exists(self, name: str) -> bool:
        """Whether the group exists in any hierarchy."""
        _check_name(name)
        return any((self._base[m] / self.parent / name).is_dir() for m in self._mounts)

    def list(self) -> builtins.list[str]:
        """Names of the existing domain groups (in any hierarchy)."""
        names: set[str] = set()
        for mount in self._mounts:
            base = self._base[mount] / self.parent
            if base.is_dir():
                names.update(
                    p.name for p in base.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)
                )
        return sorted(names)

    def remove(self, name: str) -> None:
        """Delete the group everywhere, first moving any task left in it to the root group."""
        _check_name(name)
        for mount in self._mounts:
            self._remove_in(mount, name)

    def remove_parent(self) -> None:
        """Delete every domain group and the parent group itself (tests, uninstall)."""
        for name in self.list():
            self.remove(name)
        for mount in self._mounts:
            _rmdir(self._base[mount] / self.parent)

    # -- internals --

    def _dirs(self, name: str, *, require_all: bool = False) -> builtins.list[Path]:
        _check_name(name)
        dirs = [self._base[mount] / self.parent / name for mount in self._mounts]
        present = [d for d in dirs if d.is_dir()]
        if not present or (require_all and len(present) != len(dirs)):
            raise NotFound(f"no cgroup {name!r} under {self.parent}")
        return present

    def _dir(self, controller: str, name: str) -> Path:
        _check_name(name)
        mount = self._roots.get(controller)
        if mount is None:
            raise CgroupError(f"the {controller} controller is not mounted")
        path = self._base[mount] / self.parent / name
        if not path.is_dir():
            raise NotFound(f"no cgroup {name!r} under {self.parent}")
        return path

    def _create_in(self, mount: Path, name: str) -> None:
        """Make parent chain and group in one hierarchy, setting what each level needs."""
        path = self._base[mount]
        is_cpuset = mount == self._roots.get("cpuset")
        is_memory = mount == self._roots.get("memory")
        for part in [*self.parent.split("/"), name]:
            if self.version == 2:
                self._enable_controllers(path)
            path = path / part
            _mkdir(path)
            if self.version == 1 and is_cpuset:
                self._inherit_cpuset(path, "cpuset.cpus")
                self._inherit_cpuset(path, "cpuset.mems")
        if self.version == 1 and is_memory:
            # a QEMU attached after start brings the guest RAM it already touched along
            with suppress(CgroupError):
                write_control(path / "memory.move_charge_at_immigrate", "3")

    def _enable_controllers(self, path: Path) -> None:
        """v2: delegate cpu (and cpuset, if offered) to the children of `path`."""
        offered = self._controllers(path)
        enabled = set(read_control(path / "cgroup.subtree_control").split())
        missing = [c for c in V2_CONTROLLERS if c in offered and c not in enabled]
        if missing:
            write_control(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))

    @staticmethod
    def _controllers(path: Path) -> set[str]:
        try:
            return set(read_control(path / "cgroup.controllers").split())
        except CgroupError:
            return set()

    @staticmethod
    def _inherit_cpuset(path: Path, control: str) -> None:
        """v1: an empty cpuset.cpus/mems takes its parent's value (tasks need both)."""
        if not read_control(path / control).strip():
            write_control(path / control, read_control(path.parent / control))

    def _remove_in(self, mount: Path, name: str) -> None:
        base = self._base[mount]
        path = base / self.parent / name
        tasks = "tasks" if self.version == 1 else "cgroup.procs"
        deadline = time.monotonic() + _REMOVE_TIMEOUT
        while path.is_dir():
            for task in read_control(path / tasks).split():
                try:
                    write_control(base / tasks, task)
                except CgroupError as exc:
                    if exc.errno != ESRCH:
                        raise
            try:
                _rmdir(path)
            except CgroupError as exc:
                if exc.errno != EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def own_cgroup(controller: str, proc: str = "/proc/self/cgroup") -> str:
    """This process's group path in the v1 hierarchy holding `controller` ("/" if unknown)."""
    with suppress(OSError):
        for line in Path(proc).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    return "/"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"invalid cgroup name {name!r}: use letters, digits and _.:@+-")


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
