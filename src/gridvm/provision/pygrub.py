"""pygrub: boot a PV domain with the kernel its own disk's GRUB configuration names.

Like Xen's pygrub, without mounting anything: find the partition table (`diskread`), look
for a GRUB 2 `grub.cfg` or a GRUB legacy `menu.lst`/`grub.conf` on the partitions, take the
default entry (or the one `bootloader_args` name with `--entry=N|TITLE|ID|N>M`), copy its
kernel and initrd out of the ext2/3/4 filesystem with debugfs, and hand them to the
domain's direct boot with the entry's arguments (plus gridvm's `ip=`/hostname/`extra`).

`bootloader_args` understood: `--entry=E`, `--kernel=PATH`, `--ramdisk=PATH`, `--args=TEXT`
(appended), `-q`/`--quiet` (ignored). PV-GRUB style configs (`kernel = pv-grub-*.gz` with
`extra = "(hd0,0)/boot/grub/menu.lst"`) arrive here as `--config=(hd0,0)/boot/grub/menu.lst`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from gridvm.config.bootargs import BootArgs, parse_boot_args
from gridvm.config.model import DomainConfig
from gridvm.errors import GridvmError
from gridvm.host import procs
from gridvm.provision import diskread
from gridvm.provision.disk import DiskError

CONFIGS = (
    ("/boot/grub/grub.cfg", "grub2"), ("/grub/grub.cfg", "grub2"),
    ("/boot/grub2/grub.cfg", "grub2"), ("/grub2/grub.cfg", "grub2"),
    ("/boot/grub/menu.lst", "legacy"), ("/grub/menu.lst", "legacy"),
    ("/boot/grub/grub.conf", "legacy"), ("/grub/grub.conf", "legacy"),
)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_DEVICE = re.compile(r"^\(([^)]*)\)")


class PygrubError(GridvmError):
    """The disk cannot be booted through its GRUB configuration."""


@dataclass
class BootEntry:
    """One menu entry: what GRUB would load."""

    title: str
    ident: str = ""                 # menuentry --id / $menuentry_id_option
    kernel: str = ""
    initrds: list[str] = field(default_factory=list)
    args: str = ""
    root: str | None = None         # GRUB device of the kernel, e.g. hd0,msdos1 or hd0,0
    path: str = ""                  # menu position: "0", "1>2"


@dataclass(frozen=True)
class Menu:
    entries: list[BootEntry]
    default: str


# ----- GRUB 2 -------------------------------------------------------------------------------


def _expand(text: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), text)


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True, posix=True)
    except ValueError:
        return line.split()


def parse_grub2(text: str, grubenv: str = "") -> Menu:
    """The entries of a grub.cfg (submenus flattened as `N>M`) and its default."""
    env: dict[str, str] = {}
    for line in grubenv.splitlines():
        key, eq, value = line.partition("=")
        if eq and not key.startswith("#"):
            env[key.strip()] = value.strip()
    entries: list[BootEntry] = []
    stack: list[tuple[str, int]] = []        # (kind, index) of open blocks
    counters = [0]                           # entry counter per menu level
    current: BootEntry | None = None
    default = "0"
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = _words(line)
        if not words:
            continue
        head = words[0]
        if head in ("menuentry", "submenu"):
            title = words[1] if len(words) > 1 else ""
            ident = ""
            for j, w in enumerate(words):
                if w in ("--id",) and j + 1 < len(words):
                    ident = words[j + 1]
            if not ident and len(words) > 2 and "$menuentry_id_option" in line:
                ident = words[-2] if words[-1] == "{" else words[-1]
            index = counters[-1]
            counters[-1] += 1
            prefix = ">".join(str(i) for k, i in stack if k == "submenu")
            path = f"{prefix}>{index}" if prefix else str(index)
            stack.append((head, index))
            if head == "submenu":
                counters.append(0)
            else:
                current = BootEntry(title=title, ident=ident, path=path,
                                    root=env.get("root") or None)
            continue
        if head == "}" or line == "}":
            if stack:
                kind, _ = stack.pop()
                if kind == "submenu":
                    counters.pop()
                elif current is not None:
                    if current.kernel:
                        entries.append(current)
                    current = None
            continue
        if head == "set" and len(words) > 1:
            key, _, value = words[1].partition("=")
            if current is None:
                env[key] = _expand(value, env)
                if key == "default":
                    default = env[key]
            elif key == "root":
                current.root = _expand(value, env)
            continue
        if current is None:
            continue
        if head in ("linux", "linux16", "linuxefi", "kernel") and len(words) > 1:
            current.kernel = _expand(words[1], env)
            current.args = _expand(" ".join(words[2:]), env).strip()
            current.args = " ".join(current.args.split())
        elif head in ("initrd", "initrd16", "initrdefi") and len(words) > 1:
            current.initrds = [_expand(w, env) for w in words[1:]]
        elif head == "search" and ("--set=root" in words or "--set" in words):
            uuid = next((w for w in words[1:] if not w.startswith("-")), None)
            if "--fs-uuid" in words and uuid:
                current.root = f"uuid:{uuid}"
    if default in ("${saved_entry}", "saved", ""):
        default = env.get("saved_entry", "0") or "0"
    return Menu(entries, default)


# ----- GRUB legacy ----------------------------------------------------------------------------


def parse_legacy(text: str) -> Menu:
    """The entries of a menu.lst / grub.conf and its default."""
    entries: list[BootEntry] = []
    default = "0"
    global_root: str | None = None
    current: BootEntry | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(\S+)\s*(?:=\s*|\s+)?(.*)", line)
        if not m:
            continue
        key, value = m.group(1).lower(), m.group(2).strip()
        if "=" in key:  # key=value with no spaces
            key, _, value = line.partition("=")
            key, value = key.strip().lower(), value.strip()
        if key == "title":
            current = BootEntry(title=value, path=str(len(entries)), root=global_root)
            entries.append(current)
        elif key == "default" and current is None:
            default = value.split()[0] if value else "0"
        elif key == "root":
            if current is None:
                global_root = value.strip("()")
            else:
                current.root = value.strip("()")
        elif current is not None and key == "kernel":
            parts = value.split(None, 1)
            current.kernel = parts[0] if parts else ""
            current.args = parts[1] if len(parts) > 1 else ""
        elif current is not None and key == "initrd":
            current.initrds = value.split()[:1]
    entries = [e for e in entries if e.kernel]   # paths keep their menu positions
    if default == "saved":
        default = "0"
    return Menu(entries, default)


def choose(menu: Menu, wanted: str | None) -> BootEntry:
    """The entry `wanted` names (index, `N>M`, id or title), else the menu's default."""
    if not menu.entries:
        raise PygrubError("the GRUB configuration has no bootable entry")

    def find(key: str) -> BootEntry | None:
        return next((e for e in menu.entries if key in (e.path, e.ident, e.title)), None)

    if wanted is not None:
        found = find(wanted)
        if found is None:
            titles = "; ".join(f"{e.path}: {e.title}" for e in menu.entries)
            raise PygrubError(f"no GRUB entry {wanted!r} (entries: {titles})")
        return found
    return find(menu.default) or menu.entries[0]


# ----- reading the disk ----------------------------------------------------------------------


@dataclass(frozen=True)
class Booted:
    """What pygrub extracted: files on the host and the kernel's arguments."""

    kernel: Path
    ramdisk: Path | None
    args: str
    title: str


def _partition_for(root: str | None, parts: list[diskread.Partition], default: int,
                   views: diskread.DiskViews) -> int:
    """The partition number a GRUB device names (hd0,msdos2 / hd0,1 / uuid:X)."""
    if not root or not parts:
        return default
    if root.startswith("uuid:"):
        uuid = root[5:].lower()
        return next((p.number for p in parts if views.fs_uuid(p) == uuid), default)
    m = re.match(r"\(?hd\d+,(?:msdos|gpt)?(\d+)\)?$", root)
    if not m:
        return default
    number = int(m.group(1))
    legacy = "msdos" not in root and "gpt" not in root
    return number + 1 if legacy else number


def _find_config(views: diskread.DiskViews, parts: list[diskread.Partition],
                 wanted: str | None) -> tuple[diskread.Partition | None, str, str, str]:
    """(partition, path, kind, text) of the first GRUB configuration found."""
    candidates: list[diskread.Partition | None] = [
        *sorted(parts, key=lambda p: not p.bootable)] or [None]
    configs: tuple[tuple[str, str], ...] = CONFIGS
    if wanted:
        m = _DEVICE.match(wanted)
        path = wanted[m.end():] if m else wanted
        kind = "grub2" if path.endswith(".cfg") else "legacy"
        if m and parts:
            number = _partition_for(m.group(1), parts, parts[0].number, views)
            candidates = [p for p in parts if p.number == number]
        configs = ((path, kind),)
    for part in candidates:
        reader = views.reader(part)
        if reader is None:
            continue
        for path, kind in configs:
            if reader.exists(path):
                text = reader.read(path, limit=4 << 20).decode(errors="replace")
                env = ""
                envpath = str(Path(path).parent / "grubenv")
                if kind == "grub2" and reader.exists(envpath):
                    env = reader.read(envpath, limit=1 << 20).decode(errors="replace")
                return part, path, kind, text + ("\0" + env if env else "")
    where = "an ext2/3/4 partition" if parts else "the disk (no partition table)"
    raise PygrubError(f"no GRUB configuration (grub.cfg, menu.lst or grub.conf) on {where}")


def _file_path(path: str) -> str:
    m = _DEVICE.match(path)
    return path[m.end():] if m else path


def extract(disk: Path, dest: Path, args: BootArgs | None = None) -> Booted:
    """Find the boot entry on `disk` and copy its kernel and initrd into `dest`."""
    args = args or BootArgs()
    try:
        with diskread.DiskViews(disk) as views:
            parts = views.partitions()
            part, _path, kind, text = _find_config(views, parts, args.config)
            body, _, env = text.partition("\0")
            menu = parse_grub2(body, env) if kind == "grub2" else parse_legacy(body)
            entry = choose(menu, args.entry)
            kernel = args.kernel or entry.kernel
            initrds = [args.ramdisk] if args.ramdisk else entry.initrds
            number = part.number if part else 0
            if entry.root and parts:
                number = _partition_for(entry.root, parts, number, views)
            target = next((p for p in parts if p.number == number), part)
            reader = views.reader(target)
            if reader is None:
                raise PygrubError(f"partition {number} holds no ext2/3/4 filesystem")
            dest.mkdir(parents=True, exist_ok=True)
            reader.copy_out(_file_path(kernel), dest / "vmlinuz")
            ramdisk = None
            if initrds:
                ramdisk = dest / "initrd.img"
                with ramdisk.open("wb") as out:
                    for i, item in enumerate(initrds):
                        piece = dest / f"initrd.{i}"
                        reader.copy_out(_file_path(item), piece)
                        out.write(piece.read_bytes())
                        piece.unlink()
    except (DiskError, procs.CommandError) as exc:
        raise PygrubError(str(exc)) from None
    line = " ".join(p for p in (entry.args, args.args or "") if p)
    return Booted(dest / "vmlinuz", ramdisk, line, entry.title)


class PyGrub:
    """The host manager's boot loader (gridvm.host.manager.BootLoader)."""

    def boot(self, cfg: DomainConfig, workdir: Path) -> DomainConfig:
        """`cfg` with the kernel, initrd and command line its first disk's GRUB names."""
        if not cfg.disks:
            raise PygrubError(f"domain {cfg.name}: pygrub needs a disk to boot from")
        disk = Path(cfg.disks[0].target)
        try:
            booted = extract(disk, workdir / "boot", parse_boot_args(cfg.bootloader_args))
        except PygrubError as exc:
            raise PygrubError(f"domain {cfg.name}: pygrub: {disk}: {exc}") from None
        gridvm_part = cfg.model_copy(update={"cmdline": None, "root": None}).kernel_cmdline()
        cmdline = " ".join(p for p in (booted.args, gridvm_part) if p)
        return cfg.model_copy(update={"kernel": str(booted.kernel),
                                      "ramdisk": str(booted.ramdisk) if booted.ramdisk else None,
                                      "cmdline": cmdline, "root": None})
