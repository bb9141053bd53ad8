"""The tiny guest: Debian kernels + a busybox initramfs, and a SeaBIOS-bootable FAT disk.

Nothing is installed into the host: kernel and busybox packages are fetched with
`apt-get download` (cached in images_dir/.cache), unpacked with `dpkg -x` into a
scratch directory, and the image is built in a temporary directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gridvm.errors import GridvmError, ResourceError
from gridvm.images.store import (
    DEFAULT_CMDLINE,
    MANIFEST,
    ImageError,
    ImageInfo,
    get_image,
    write_manifest,
)

NAME = "tiny"
PV_KERNEL_META = "linux-image-cloud-amd64"
HVM_KERNEL_META = "linux-image-amd64"
BUSYBOX_PKG = "busybox-static"
BOOT_LABEL = "GRIDVMBOOT"
LOCK_TIMEOUT = 1800.0
RECIPE_VERSION = 1  # bump when the build itself changes
HVM_EXTRA_CMDLINE = "no_timer_check"   # as gridvm adds for PV under TCG (qemu/argv.py)

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModuleSet:
    """Modules for one initramfs; dependencies are added from each `.modinfo`."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


VIRTIO = (
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)
VIRTIO_EXTRA = ("virtio_balloon", "virtio_rng", "virtio_console")
COMMON = ("pvpanic", "pvpanic_pci", "pvpanic_mmio", "button", "evdev")

PV_MODULES = ModuleSet(required=VIRTIO, optional=VIRTIO_EXTRA + COMMON)
HVM_MODULES = ModuleSet(
    required=("e1000", "scsi_mod", "libata", "ata_piix", "sd_mod"),
    optional=("ahci",) + COMMON + VIRTIO + VIRTIO_EXTRA,
)

# Module parameters given to insmod (SCSI disks visible as soon as the module loads).
MODULE_ARGS = {"scsi_mod": "scan=sync"}

# Guest files: (name in the package's guest/ folder, path in the initramfs, mode).
GUEST_FILES = (
    ("init", "init", 0o755),
    ("http.sh", "etc/gridvm/http.sh", 0o755),
    ("udhcpc", "etc/gridvm/udhcpc", 0o755),
    ("power", "etc/acpi/power", 0o755),
    ("acpid.conf", "etc/acpid.conf", 0o644),
    ("profile", "etc/profile", 0o644),
)


def run_bytes(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    data: bytes | None = None,
) -> bytes:
    """Run a command (stdin: `data` or nothing); return stdout, or raise ImageError.

    The one place this package starts external programs; errors carry the stderr tail.
    """
    args = [str(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=full_env,
            input=data,
            stdin=subprocess.DEVNULL if data is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise ResourceError(f"{args[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{args[0]} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        tail = " | ".join(lines[-3:]) or f"exit status {proc.returncode}"
        raise ImageError(f"{' '.join(args[:3])} failed: {tail}")
    return proc.stdout


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> str:
    """run_bytes, with stdout decoded as text."""
    return run_bytes(argv, cwd=cwd, timeout=timeout, env=env).decode(errors="replace")


def _need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ResourceError(
            f"missing host tools: {', '.join(missing)} (apt-get install cpio mtools syslinux)"
        )


# --- packages -----------------------------------------------------------------


def _cached_kernels(meta: str, cache: Path) -> list[str]:
    """Versioned kernel packages of meta's flavour with a .deb in the cache, newest first."""
    flavour = meta.removeprefix("linux-image-")
    pattern = re.compile(rf"^(linux-image-\d[^_]*-{re.escape(flavour)})_")
    found = sorted(cache.glob("linux-image-*.deb"), key=lambda p: p.stat().st_mtime, reverse=True)
    out: list[str] = []
    for p in found:
        m = pattern.match(p.name)
        if m and (flavour != "amd64" or not re.search(r"-(cloud|rt)-amd64_", p.name)):
            out.append(m.group(1))
    return out


def resolve_kernel_package(meta: str, cache: Path) -> str:
    """The versioned kernel package a metapackage depends on (apt-cache, else the cache)."""
    try:
        out = run(["apt-cache", "depends", meta], timeout=60)
    except (ImageError, ResourceError):
        out = ""
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    cached = _cached_kernels(meta, cache)
    if cached:
        return cached[0]
    raise ResourceError(f"cannot resolve {meta}: apt-cache knows no such package (apt-get update?)")


def fetch_kernel(meta: str, cache: Path, log: Log) -> Path:
    """The .deb of meta's current kernel; an older cached one if the download fails."""
    pkg = resolve_kernel_package(meta, cache)
    try:
        return fetch_deb(pkg, cache, log)
    except (ImageError, ResourceError) as e:
        cached = _cached_kernels(meta, cache)
        if not cached:
            raise
        log(f"cannot download {pkg} ({e}); using cached {cached[0]}")
        return fetch_deb(cached[0], cache, log)


def fetch_deb(pkg: str, cache: Path, log: Log) -> Path:
    """pkg's .deb from the cache, downloading it with `apt-get download` if absent."""
    cache.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
    if cached:
        return cached[-1]
    log(f"downloading {pkg}")
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        argv += ["-o", "APT::Sandbox::User=root"]
    dl = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache))
    try:
        run([*argv, pkg], cwd=dl, timeout=900)
        debs = list(dl.glob(f"{pkg}_*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {pkg} produced no .deb")
        target = cache / debs[0].name
        debs[0].replace(target)
        return target
    finally:
        shutil.rmtree(dl, ignore_errors=True)


def unpack(deb: Path, dest: Path) -> Path:
    """`dpkg -x` deb into dest (never into the host's /)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg", "-x", deb, dest], timeout=600)
    return dest


# --- kernel modules -------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package: vmlinuz, version and module tree."""

    version: str
    vmlinuz: Path
    modules: Path

    @classmethod
    def find(cls, root: Path) -> Kernel:
        for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                vmlinuz = root / "boot" / f"vmlinuz-{d.name}"
                if vmlinuz.is_file():
                    return cls(d.name, vmlinuz, d)
        raise ImageError(f"no kernel (boot/vmlinuz-* + modules) in {root}")

    def index(self) -> dict[str, Path]:
        """Module name (with underscores) -> file."""
        out: dict[str, Path] = {}
        for p in self.modules.rglob("*.ko*"):
            m = re.fullmatch(r"(.+)\.ko(\.xz|\.gz|\.zst)?", p.name)
            if m:
                out[m.group(1).replace("-", "_")] = p
        return out

    def builtin(self) -> set[str]:
        path = self.modules / "modules.builtin"
        if not path.is_file():
            return set()
        return {
            Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
            for line in path.read_text().splitlines()
            if line.strip()
        }


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing .ko.xz / .ko.gz."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise ImageError(f"{path.name}: zstd-compressed modules are not supported")
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value pairs of an ELF64 module's .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ImageError("not an ELF64 kernel module")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    out: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end] != b".modinfo":
            continue
        for item in elf[off : off + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                out.setdefault(key, []).append(value)
    return out


def module_order(kernel: Kernel, wanted: ModuleSet) -> list[tuple[str, bytes]]:
    """(name, ELF bytes) for the wanted modules and their dependencies, load order."""
    index = kernel.index()
    builtin = kernel.builtin()
    done: set[str] = set()
    order: list[tuple[str, bytes]] = []

    def visit(name: str, required: bool) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name not in index:
            if required:
                raise ImageError(f"kernel {kernel.version} has no module {name}")
            return
        done.add(name)
        elf = read_module(index[name])
        info = modinfo(elf)
        for deps in info.get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep, True)
        for soft in info.get("softdep", []):
            pre = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", soft)
            for dep in (pre.group(1).split() if pre else []):
                visit(dep, False)
        order.append((name, elf))

    for name in wanted.required:
        visit(name, True)
    for name in wanted.optional:
        visit(name, False)
    return order


# --- initramfs ------------------------------------------------------------------


def _guest_file(name: str) -> bytes:
    return resources.files("gridvm.images").joinpath("guest", name).read_bytes()


def stage_initramfs(root: Path, busybox: Path, kernel: Kernel, wanted: ModuleSet) -> list[str]:
    """Fill root with busybox, applet links, modules and the guest scripts."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "root", "var/log", "etc/gridvm", "etc/acpi", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in run([busybox, "--list-full"], timeout=30).split():
        link = root / applet.lstrip("/")
        if link.name in ("busybox", "init", "linuxrc") or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for src, dst, mode in GUEST_FILES:
        target = root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_guest_file(src))
        target.chmod(mode)
    names: list[str] = []
    for name, elf in module_order(kernel, wanted):
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(elf)
        names.append(name)
    (root / "etc" / "gridvm" / "modules").write_text(
        "".join(f"{n} {MODULE_ARGS.get(n, '')}".rstrip() + "\n" for n in names)
    )
    return names


def pack_initramfs(root: Path, out: Path) -> None:
    """cpio newc (owned by root) of root, gzip-compressed, into out."""
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = run_bytes(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
        cwd=root,
        data=("\n".join(paths) + "\n").encode(),
        timeout=120,
    )
    with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as f:
        f.write(archive)


# --- HVM boot disk --------------------------------------------------------------


SYSLINUX_CFG = """\
SERIAL 0 115200
DEFAULT gridvm
PROMPT 0
TIMEOUT 0
LABEL gridvm
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND {cmdline}
"""


def make_boot_disk(out: Path, kernel: Path, initrd: Path, cmdline: str) -> None:
    """A FAT superfloppy labelled GRIDVMBOOT with syslinux: SeaBIOS boots it as a disk."""
    cfg = out.parent / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG.format(cmdline=cmdline))
    payload = kernel.stat().st_size + initrd.stat().st_size
    mib = max(16, -(-(payload + 4 * 2**20) // 2**20))
    with out.open("wb") as f:
        f.truncate(mib * 2**20)
    env = {"MTOOLS_SKIP_CHECK": "1"}
    # 64 heads x 32 sectors = 1 MiB per cylinder.
    run(["mformat", "-i", out, "-t", str(mib), "-h", "64", "-s", "32",
         "-v", BOOT_LABEL, "::"], env=env, timeout=60)
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
        run(["mcopy", "-i", out, src, f"::/{name}"], env=env, timeout=60)
    run(["syslinux", "--install", out], env=env, timeout=60)
    cfg.unlink()
    if BOOT_LABEL.encode() not in out.read_bytes()[:512]:
        raise ImageError(f"{out.name}: boot sector lacks the {BOOT_LABEL} label")


# --- build ----------------------------------------------------------------------


def recipe_id() -> str:
    """Hash of everything that shapes the image besides the packages (a change rebuilds)."""
    recipe = (f"{RECIPE_VERSION}|{PV_MODULES}|{HVM_MODULES}|{MODULE_ARGS}|{SYSLINUX_CFG}|"
              f"{HVM_EXTRA_CMDLINE}")
    h = hashlib.sha256(recipe.encode())
    for src, dst, mode in GUEST_FILES:
        h.update(f"|{src}|{dst}|{mode}|".encode())
        h.update(_guest_file(src))
    return h.hexdigest()[:16]


def _cached(images_dir: Path) -> ImageInfo | None:
    try:
        info = get_image(images_dir, NAME)
    except GridvmError:
        return None
    return info if info.recipe == recipe_id() else None


@contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    with path.open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ResourceError(f"{path}: another image build holds the lock") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_tiny(
    images_dir: Path, *, force: bool = False, log: Callable[[str], None] | None = None
) -> ImageInfo:
    """Build (or return the cached) tiny image in images_dir/tiny; atomic and idempotent."""
    say: Log = log or (lambda _msg: None)
    images_dir = Path(images_dir).absolute()
    final = images_dir / NAME
    if not force and (cached := _cached(images_dir)) is not None:
        return cached
    images_dir.mkdir(parents=True, exist_ok=True)
    with _locked(images_dir / f".{NAME}.lock", LOCK_TIMEOUT):
        if not force and (cached := _cached(images_dir)) is not None:
            return cached
        if (final / MANIFEST).is_file() and not force:
            say("image recipe changed: rebuilding")
        _need_tools("dpkg", "cpio", "mformat", "mcopy", "syslinux")
        for stale in [*images_dir.glob(f".{NAME}.build-*"), *images_dir.glob(f".{NAME}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{NAME}.build-", dir=images_dir))
        try:
            started = time.monotonic()
            _build_into(work, images_dir / ".cache", say)
            _replace_dir(work / "out", final)
            say(f"built {final} in {time.monotonic() - started:.1f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return get_image(images_dir, NAME)


def _build_into(work: Path, cache: Path, say: Log) -> None:
    out = work / "out"
    out.mkdir()
    debs = {
        "pv": fetch_kernel(PV_KERNEL_META, cache, say),
        "hvm": fetch_kernel(HVM_KERNEL_META, cache, say),
        "busybox": fetch_deb(BUSYBOX_PKG, cache, say),
    }
    say("unpacking " + ", ".join(d.name for d in debs.values()))
    busybox_root = unpack(debs["busybox"], work / "busybox")
    candidates = (busybox_root / "bin" / "busybox", busybox_root / "usr" / "bin" / "busybox")
    busybox = next((p for p in candidates if p.is_file()), None)
    if busybox is None:
        raise ImageError(f"{debs['busybox'].name} has no bin/busybox")

    built: dict[str, tuple[Kernel, list[str]]] = {}
    for tag, wanted in (("pv", PV_MODULES), ("hvm", HVM_MODULES)):
        kernel = Kernel.find(unpack(debs[tag], work / tag))
        stage = work / f"{tag}-root"
        mods = stage_initramfs(stage, busybox, kernel, wanted)
        say(f"{tag} initramfs for {kernel.version}: {' '.join(mods)}")
        suffix = "" if tag == "pv" else "-hvm"
        shutil.copyfile(kernel.vmlinuz, out / f"vmlinuz{suffix}")
        pack_initramfs(stage, out / f"initrd{suffix}.img")
        shutil.rmtree(work / tag)
        built[tag] = (kernel, mods)

    say("making HVM boot disk")
    make_boot_disk(out / "disk.img", out / "vmlinuz-hvm", out / "initrd-hvm.img",
                   f"{DEFAULT_CMDLINE} {HVM_EXTRA_CMDLINE}")
    info = ImageInfo(
        name=NAME,
        kernel=out / "vmlinuz",
        ramdisk=out / "initrd.img",
        disk=out / "disk.img",
        hvm_kernel=out / "vmlinuz-hvm",
        hvm_ramdisk=out / "initrd-hvm.img",
        cmdline=DEFAULT_CMDLINE,
        kernel_version=built["pv"][0].version,
        hvm_kernel_version=built["hvm"][0].version,
        recipe=recipe_id(),
    )
    (out / "modules.json").write_text(
        json.dumps({tag: mods for tag, (_, mods) in built.items()}, indent=2) + "\n"
    )
    for p in out.iterdir():
        p.chmod(0o644)
    write_manifest(out, info)


def _replace_dir(new: Path, final: Path) -> None:
    """Move new to final; an existing final is swapped out and deleted."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
