"""Safe file access inside a guest's root tree (a build, an import, an rsync of a system).

Paths are resolved the way the guest would see them (as under `chroot`): an absolute
symlink `/etc/resolv.conf -> /run/...` points inside the tree, never at the host. Nothing
read or written here can escape the tree, so an imported, untrusted tree is handled as
data only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from gridvm.errors import GridvmError

MAX_LINKS = 40


class TreeError(GridvmError):
    """A path inside a guest tree cannot be resolved or used."""


class Tree:
    """A guest's root directory on the host."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def resolve(self, path: str, *, follow_last: bool = True) -> Path:
        """The host path of guest path `path`, following symlinks inside the tree."""
        parts = [p for p in PurePosixPath("/" + path).parts[1:]]
        done: list[str] = []
        hops = 0
        while parts:
            name = parts.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if done:
                    done.pop()
                continue
            host = self.root.joinpath(*done, name)
            if host.is_symlink() and (parts or follow_last):
                hops += 1
                if hops > MAX_LINKS:
                    raise TreeError(f"{path}: too many levels of symbolic links")
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []
                parts = [p for p in PurePosixPath(target).parts if p != "/"] + parts
                continue
            done.append(name)
        return self.root.joinpath(*done)

    def exists(self, path: str) -> bool:
        try:
            return self.resolve(path).exists()
        except TreeError:
            return False

    def is_file(self, path: str) -> bool:
        try:
            return self.resolve(path).is_file()
        except TreeError:
            return False

    def is_dir(self, path: str) -> bool:
        try:
            return self.resolve(path).is_dir()
        except TreeError:
            return False

    def read_text(self, path: str, default: str | None = None) -> str:
        """A text file's content; `default` (or TreeError) if it is missing."""
        host = self.resolve(path)
        if not host.is_file():
            if default is not None:
                return default
            raise TreeError(f"{path}: no such file in {self.root}")
        return host.read_text(errors="replace")

    def write_text(self, path: str, text: str, mode: int = 0o644,
                   owner: tuple[int, int] = (0, 0)) -> None:
        """Create or replace a regular file (a symlink in its place is replaced, not followed)."""
        self.write_bytes(path, text.encode(), mode, owner)

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644,
                    owner: tuple[int, int] = (0, 0)) -> None:
        parent = self.mkdir(str(PurePosixPath("/" + path).parent))
        host = parent / PurePosixPath(path).name
        if host.is_symlink() or host.is_file():
            host.unlink()
        elif host.exists():
            raise TreeError(f"{path}: exists and is not a regular file")
        tmp = parent / f".{host.name}.gridvm-tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        tmp.replace(host)

    def mkdir(self, path: str, mode: int = 0o755) -> Path:
        """Create a directory (and its parents) inside the tree; its host path."""
        host = self.resolve(path)
        if not host.is_dir():
            if host.exists() or host.is_symlink():
                raise TreeError(f"{path}: exists and is not a directory")
            parent = self.mkdir(str(PurePosixPath("/" + path).parent), mode)
            (parent / host.name).mkdir(mode=mode, exist_ok=True)
        return host

    def remove(self, path: str) -> bool:
        """Remove a file or symlink (never what it points at); True if something went."""
        host = self.resolve(str(PurePosixPath("/" + path).parent)) / PurePosixPath(path).name
        if host.is_symlink() or host.is_file():
            host.unlink()
            return True
        if host.exists() and not host.is_dir():  # sockets, fifos, device nodes
            host.unlink()
            return True
        return False

    def symlink(self, path: str, target: str) -> None:
        """Make `path` a symlink to `target` (replacing a file or link there)."""
        parent = self.mkdir(str(PurePosixPath("/" + path).parent))
        host = parent / PurePosixPath(path).name
        if host.is_symlink() or host.is_file():
            host.unlink()
        host.symlink_to(target)

    def files(self, directory: str, pattern: str = "*") -> Iterator[str]:
        """Guest paths of the regular files and symlinks in `directory` matching `pattern`."""
        try:
            host = self.resolve(directory)
        except TreeError:
            return
        if not host.is_dir():
            return
        base = "/" + str(PurePosixPath("/" + directory)).strip("/")
        for entry in sorted(host.glob(pattern)):
            mode = entry.lstat().st_mode
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                yield f"{base.rstrip('/')}/{entry.name}"

    def walk_files(self, directory: str) -> Iterator[str]:
        """Guest paths of every non-directory below `directory` (symlinks are not followed)."""
        try:
            host = self.resolve(directory)
        except TreeError:
            return
        if not host.is_dir() or host.is_symlink():
            return
        for dirpath, dirnames, filenames in os.walk(host, followlinks=False):
            rel = Path(dirpath).relative_to(self.root)
            for name in sorted(filenames) + [d for d in dirnames
                                             if (Path(dirpath) / d).is_symlink()]:
                yield "/" + str(rel / name)
