"""Read files from a guest's disk image without mounting it.

The partition table comes from `sfdisk --json`; ext2/3/4 filesystems are read with
e2fsprogs' `debugfs`, which opens a filesystem at a byte offset inside an image file
(`IMAGE?offset=N`). A qcow2 image is first narrowed to the one partition needed with
`qemu-img convert` over QEMU's raw driver (`offset=`/`size=`), into a sparse temporary file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gridvm.host import procs
from gridvm.provision.disk import SECTOR, DiskError

EXT_MAGIC_OFFSET = 1024 + 56
EXT_MAGIC = b"\x53\xef"
MAX_LINKS = 16
_LS_LINE = re.compile(r"^\s*\d+\s+(\d+)\s+\(\d+\)\s+\d+\s+\d+\s+\d+\s+\S+\s+\S+\s(.*)$")


@dataclass(frozen=True)
class Partition:
    number: int
    start: int      # bytes
    size: int       # bytes
    type: str
    bootable: bool


def image_format(path: Path) -> str:
    """`raw` or `qcow2` (by qemu-img info)."""
    out = procs.run(["qemu-img", "info", "--output=json", str(path)], timeout=30).stdout
    fmt = str(json.loads(out).get("format", "raw"))
    if fmt not in ("raw", "qcow2"):
        raise DiskError(f"{path}: unsupported disk format {fmt!r}")
    return fmt


def virtual_size(path: Path, fmt: str) -> int:
    out = procs.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)],
                    timeout=30).stdout
    return int(json.loads(out)["virtual-size"])


def partitions(disk: Path, fmt: str = "raw") -> list[Partition]:
    """The disk's msdos/gpt partitions ([] for a bare filesystem or an empty table)."""
    with tempfile.TemporaryDirectory(prefix="gridvm-pt-") as tmp:
        table = disk
        if fmt != "raw":  # the first MiB, as a sparse file of the disk's full size
            table = Path(tmp) / "head.raw"
            _extract(disk, fmt, table, 0, min(1 << 20, virtual_size(disk, fmt)))
            with table.open("r+b") as f:
                f.truncate(virtual_size(disk, fmt))
        proc = procs.run(["sfdisk", "--json", str(table)], check=False, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    data = json.loads(proc.stdout)["partitiontable"]
    unit = int(data.get("sectorsize", SECTOR))
    out = []
    for i, p in enumerate(data.get("partitions", []), start=1):
        m = re.search(r"(\d+)$", str(p.get("node", "")))
        out.append(Partition(number=int(m.group(1)) if m else i, start=int(p["start"]) * unit,
                             size=int(p["size"]) * unit, type=str(p.get("type", "")),
                             bootable=bool(p.get("bootable", False))))
    return out


def _extract(disk: Path, fmt: str, out: Path, offset: int, size: int) -> None:
    opts = (f"driver=raw,offset={offset},size={size},file.driver={fmt},"
            f"file.file.driver=file,file.file.filename={_opt(str(disk))}")
    procs.run(["qemu-img", "convert", "-q", "--image-opts", opts, "-O", "raw", str(out)],
              timeout=1800)


def _opt(value: str) -> str:
    """A value inside a QEMU option string (commas doubled)."""
    return value.replace(",", ",,")


@contextmanager
def raw_view(disk: Path, fmt: str, part: Partition | None) -> Iterator[tuple[Path, int]]:
    """(file, byte offset) where `part` (None: the whole disk) can be read as raw bytes."""
    if fmt == "raw":
        yield disk, part.start if part else 0
        return
    tmp = Path(tempfile.mkdtemp(prefix="gridvm-part-"))
    try:
        out = tmp / "part.raw"
        size = part.size if part else virtual_size(disk, fmt)
        _extract(disk, fmt, out, part.start if part else 0, size)
        yield out, 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DiskViews:
    """Raw views of one disk's partitions, each made at most once, released together."""

    def __init__(self, disk: Path, fmt: str | None = None) -> None:
        self.disk = disk
        self.fmt = fmt or image_format(disk)
        self._stack = ExitStack()
        self._views: dict[int, tuple[Path, int]] = {}

    def __enter__(self) -> DiskViews:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def partitions(self) -> list[Partition]:
        return partitions(self.disk, self.fmt)

    def view(self, part: Partition | None) -> tuple[Path, int]:
        key = part.number if part else 0
        if key not in self._views:
            self._views[key] = self._stack.enter_context(raw_view(self.disk, self.fmt, part))
        return self._views[key]

    def reader(self, part: Partition | None) -> ExtReader | None:
        """An ext2/3/4 reader of the partition, None if it holds no such filesystem."""
        if self.fmt != "raw" and not self._ext_head(part):
            return None
        image, offset = self.view(part)
        return ExtReader(image, offset) if is_ext(image, offset) else None

    def _ext_head(self, part: Partition | None) -> bool:
        with tempfile.TemporaryDirectory(prefix="gridvm-sb-") as tmp:
            head = Path(tmp) / "head"
            _extract(self.disk, self.fmt, head, part.start if part else 0, 64 << 10)
            return is_ext(head, 0)

    def fs_uuid(self, part: Partition) -> str:
        """The filesystem UUID of a partition (blkid), '' if none."""
        with tempfile.TemporaryDirectory(prefix="gridvm-sb-") as tmp:
            if self.fmt == "raw":
                image, offset = self.disk, part.start
            else:
                image, offset = Path(tmp) / "head", 0
                _extract(self.disk, self.fmt, image, part.start, min(part.size, 1 << 20))
            out = procs.run(["blkid", "-p", "-O", str(offset), "-o", "export", str(image)],
                            check=False, timeout=30).stdout.decode()
        fields = dict(line.partition("=")[::2] for line in out.splitlines())
        return fields.get("UUID", "").lower()


def is_ext(image: Path, offset: int) -> bool:
    """Whether an ext2/3/4 superblock sits at `offset`."""
    try:
        with image.open("rb") as f:
            f.seek(offset + EXT_MAGIC_OFFSET)
            return f.read(2) == EXT_MAGIC
    except OSError:
        return False


class ExtReader:
    """An ext2/3/4 filesystem at an offset in an image file, read with debugfs."""

    def __init__(self, image: Path, offset: int = 0) -> None:
        self.image = image
        self.offset = offset
        if not is_ext(image, offset):
            raise DiskError(f"{image}: no ext2/3/4 filesystem at byte {offset}")

    @property
    def device(self) -> str:
        return f"{self.image}?offset={self.offset}" if self.offset else str(self.image)

    def _debugfs(self, request: str) -> bytes:
        return procs.run(self._argv("-R", request), timeout=600).stdout

    def _argv(self, *args: str) -> list[str]:
        """debugfs on this filesystem, read-only in catastrophic mode (-c): it does not read
        the allocation bitmaps, which reads never need and which a filesystem whose guest
        died before replaying its journal may not match (debugfs then refuses to open it)."""
        return ["debugfs", "-c", *args, self.device]

    def _stat(self, path: str) -> dict[str, str]:
        """`Type` and, for fast symlinks, `Fast link dest` of one inode ({} if absent)."""
        proc = procs.run(self._argv("-R", f'stat "{_quote(path)}"'), timeout=60, check=False)
        text = proc.stdout.decode(errors="replace")
        out: dict[str, str] = {}
        m = re.search(r"Type: (\w+)", text)
        if m:
            out["type"] = m.group(1)
        m = re.search(r'Fast link dest: "(.*)"', text)
        if m:
            out["link"] = m.group(1)
        return out

    def resolve(self, path: str) -> tuple[str, str]:
        """(path with symlinks resolved, inode type); type '' if it does not exist."""
        parts = [p for p in PurePosixPath("/" + path).parts[1:]]
        done: list[str] = []
        hops = 0
        kind = "directory"
        while parts:
            name = parts.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + "/".join([*done, name])
            info = self._stat(candidate)
            kind = info.get("type", "")
            if not kind:
                return candidate, ""
            if kind == "symlink":
                hops += 1
                target = info.get("link")
                if target is None or hops > MAX_LINKS:
                    raise DiskError(f"{path}: cannot follow symbolic link {candidate}")
                if target.startswith("/"):
                    done = []
                parts = [p for p in PurePosixPath(target).parts if p != "/"] + parts
                continue
            done.append(name)
        return "/" + "/".join(done), kind

    def exists(self, path: str) -> bool:
        return self.resolve(path)[1] != ""

    def read(self, path: str, limit: int = 64 << 20) -> bytes:
        """A regular file's content (symlinks followed)."""
        real, kind = self.resolve(path)
        if kind != "regular":
            raise DiskError(f"{path}: no such file on the guest's disk"
                            if not kind else f"{path}: not a regular file ({kind})")
        data = self._debugfs(f'cat "{_quote(real)}"')
        if len(data) > limit:
            raise DiskError(f"{path}: larger than {limit >> 20} MiB")
        return data

    def listdir(self, path: str) -> list[str]:
        """Names in a directory (without . and ..)."""
        real, kind = self.resolve(path)
        if kind != "directory":
            return []
        out = self._debugfs(f'ls -l "{_quote(real)}"').decode(errors="replace")
        names = [m.group(2) for m in map(_LS_LINE.match, out.splitlines()) if m]
        return [n for n in names if n not in (".", "..")]

    def copy_out(self, path: str, dest: Path) -> None:
        """A regular file to `dest` on the host (symlinks followed)."""
        real, kind = self.resolve(path)
        if kind != "regular":
            raise DiskError(f"{path}: no such file on the guest's disk"
                            if not kind else f"{path}: not a regular file ({kind})")
        dest.unlink(missing_ok=True)
        self._debugfs(f'dump "{_quote(real)}" "{_quote(str(dest))}"')
        if not dest.is_file():
            raise DiskError(f"{path}: debugfs could not copy it out")

    def copy_tree(self, dest: Path) -> None:
        """The whole filesystem into directory `dest`, owners and modes kept.

        debugfs's rdump sets each file's mode before its owner, so the kernel drops setuid,
        setgid and sticky bits: one batched `ls -l` of every directory puts them back.
        (Extended attributes such as file capabilities are not copied.)
        """
        dest.mkdir(parents=True, exist_ok=True)
        self._debugfs(f'rdump / "{_quote(str(dest))}"')
        dirs = ["/"]
        for dirpath, dirnames, _ in os.walk(dest):
            rel = "/" + str(Path(dirpath).relative_to(dest)).lstrip(".")
            dirs += [f"{rel.rstrip('/')}/{d}" for d in dirnames
                     if not (Path(dirpath) / d).is_symlink()]
        script = dest.parent / f".{dest.name}.ls"
        script.write_text("".join(f'ls -l "{d}"\n' for d in dirs
                                  if '"' not in d and "\n" not in d))
        try:
            out = procs.run(self._argv("-f", str(script)),
                            timeout=600).stdout.decode(errors="replace")
        finally:
            script.unlink(missing_ok=True)
        current = "/"
        for line in out.splitlines():
            if line.startswith("debugfs: ls -l "):
                current = line[len("debugfs: ls -l "):].strip().strip('"')
                continue
            m = _LS_LINE.match(line)
            if not m:
                continue
            mode, name = int(m.group(1), 8), m.group(2)
            if mode & 0o7000 and name not in (".", ".."):
                target = dest / current.lstrip("/") / name
                if not target.is_symlink() and target.exists():
                    os.chmod(target, mode & 0o7777)
        root_mode = int(self._stat_mode("/"), 8)
        if root_mode & 0o7000:
            os.chmod(dest, root_mode & 0o7777)

    def _stat_mode(self, path: str) -> str:
        text = procs.run(self._argv("-R", f'stat "{_quote(path)}"'),
                         timeout=60).stdout.decode(errors="replace")
        m = re.search(r"Mode:\s+(\d+)", text)
        return m.group(1) if m else "0"


def _quote(path: str) -> str:
    if '"' in path or "\n" in path or "\0" in path:
        raise DiskError(f"unsupported character in path {path!r}")
    return path
